"""Helpers shared by the functional losses (reduction of possibly empty losses, range checks)."""
from __future__ import annotations

import torch

from .._checks import check_reduction, reduce_loss


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """torch.nn.functional's reduction, except that the mean of an empty loss is 0 (not NaN).

    The zero is ``loss.sum()`` so that it stays connected to the graph.
    """
    check_reduction(reduction)
    if reduction == "mean" and loss.numel() == 0:
        return loss.sum()
    return reduce_loss(loss, reduction)


def first_bad(mask: torch.Tensor) -> tuple:
    """Index (as a tuple) of the first True element of ``mask``."""
    idx = mask.nonzero()[0]
    return tuple(int(i) for i in idx)


def check_in_range(name: str, t: torch.Tensor, low: float, high: float, what: str) -> None:
    """ValueError naming ``name`` when some element of ``t`` lies outside [low, high] (or is NaN)."""
    if t.numel() == 0:
        return
    lo, hi = torch.aminmax(t)  # one pass, no full-size temporaries; NaN propagates and fails below
    if bool((lo >= low) & (hi <= high)):
        return
    bad = ~((t >= low) & (t <= high))
    if bool(bad.any()):
        pos = first_bad(bad)
        raise ValueError(
            f"{name}: expected {what} in [{low}, {high}], got {float(t[pos]):g} at index {pos}"
        )
