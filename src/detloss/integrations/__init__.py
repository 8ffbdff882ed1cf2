"""Adapters from frameworks' own call formats to detloss's losses; none imports its framework."""
