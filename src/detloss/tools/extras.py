"""The optional dependencies of the tools, and one clear error when they are missing.

``pip install detloss`` installs the core (torch, numpy); the demo detector (``detloss train``)
and the assignment pictures (``detloss assign --png/--image``) need the ``demo`` extra:
``pip install 'detloss[demo]'``.
"""
from __future__ import annotations

import importlib.util
from typing import Dict, Sequence, Tuple

__all__ = ["MissingExtraError", "DEMO", "PICTURES", "missing", "require"]

#: import name -> the distribution pip installs it from
DISTRIBUTIONS: Dict[str, str] = {"PIL": "pillow", "matplotlib": "matplotlib", "pycocotools": "pycocotools",
                                 "tqdm": "tqdm"}
#: what ``detloss train`` imports (data, progress bar, plots, COCO evaluation)
DEMO: Tuple[str, ...] = ("PIL", "matplotlib", "pycocotools", "tqdm")
#: what drawing an assignment picture imports
PICTURES: Tuple[str, ...] = ("PIL",)


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message says which extra installs it."""


def missing(modules: Sequence[str]) -> Tuple[str, ...]:
    """The top-level modules of ``modules`` that are not installed (found without importing them)."""
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return tuple(out)


def require(modules: Sequence[str], purpose: str, extra: str = "demo") -> None:
    """Raise :class:`MissingExtraError` naming the extra to install when one of ``modules`` is missing."""
    absent = missing(modules)
    if absent:
        names = ", ".join(DISTRIBUTIONS.get(m, m) for m in absent)
        raise MissingExtraError(f"{purpose} needs {names} (the {extra!r} extra), which is not installed: "
                                f"pip install 'detloss[{extra}]'")
