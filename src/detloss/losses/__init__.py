"""The detector losses: assignment + functional losses, composed."""
