"""The explainable losses: every family module's ``SPECS`` and ``ALIASES``, gathered in one place.

A new family is one module in this package with ``SPECS`` (name -> :class:`~.family.Spec`) and
``ALIASES`` (short name -> (name, preset options)), listed in ``FAMILIES`` below.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

from . import bce, cross_entropy, dfl, focal, hungarian, iou, regression
from .family import Spec

__all__ = ["FAMILIES", "LOSSES", "ALIASES"]

FAMILIES = (bce, cross_entropy, focal, regression, iou, dfl, hungarian)

LOSSES: Dict[str, Spec] = {}
ALIASES: Dict[str, Tuple[str, Dict[str, Any]]] = {}
for _family in FAMILIES:
    for _table, _new in ((LOSSES, _family.SPECS), (ALIASES, _family.ALIASES)):
        _clash = set(_table) & set(_new)
        if _clash:
            raise RuntimeError(f"{_family.__name__}: names already taken by another family: {sorted(_clash)}")
        _table.update(_new)
