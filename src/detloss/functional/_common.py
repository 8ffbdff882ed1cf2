"""Helpers shared by the functional losses (reduction of possibly empty losses, value checks)."""
from __future__ import annotations

from typing import Sequence

import torch

from .._checks import check_reduction, reduce_loss
from ..kernels import unwrap_functorch


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """torch.nn.functional's reduction, except that the mean of an empty loss is 0 (not NaN).

    The zero is ``loss.sum()`` so that it stays connected to the graph.
    """
    check_reduction(reduction)
    if reduction == "mean" and loss.numel() == 0:
        return loss.sum()
    return reduce_loss(loss, reduction)


def values(t: torch.Tensor) -> torch.Tensor:
    """The values of ``t`` for a check: detached and, inside ``torch.func`` transforms, the plain
    tensor beneath (under ``vmap`` it holds every batch entry; a check of it is a check of each,
    and needs no data-dependent control flow inside the transform)."""
    return unwrap_functorch(t.detach())


def first_bad(mask: torch.Tensor) -> tuple:
    """Index (as a tuple) of the first True element of ``mask``."""
    idx = mask.nonzero()[0]
    return tuple(int(i) for i in idx)


def check_in_range(name: str, t: torch.Tensor, low: float, high: float, what: str) -> None:
    """ValueError naming ``name`` when some element of ``t`` lies outside [low, high] (or is NaN)."""
    t = values(t)
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


def check_binary(name: str, t: torch.Tensor) -> None:
    """ValueError naming ``name`` when some element of ``t`` is neither 0 nor 1."""
    t = values(t)
    if t.numel() == 0:
        return
    if t.is_floating_point() and not bool((t * (t - 1)).any()):
        return  # t (t - 1) is 0 exactly at 0 and 1 (NaN, inf and every other value give non-zero):
        # two arithmetic passes instead of two boolean comparisons and their conjunction
    bad = (t != 0) & (t != 1)
    if bool(bad.any()):
        pos = first_bad(bad)
        raise ValueError(f"{name}: expected 0 or 1, got {float(t[pos]):.9g} at index {pos}")


def check_unit_interval(name: str, value: float, sentinels: Sequence[float] = ()) -> float:
    """``value`` as a float in [0, 1] (or one of ``sentinels``), else ValueError naming ``name``."""
    value = float(value)
    if 0.0 <= value <= 1.0 or value in sentinels:
        return value
    also = "".join(f" or {s:g}" for s in sentinels)
    raise ValueError(f"{name}: expected a number in [0, 1]{also}, got {value!r}")
