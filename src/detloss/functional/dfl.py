"""Distribution focal loss (GFL, YOLOv8's DFL).

Reference: Li et al. 2020, "Generalized Focal Loss" (arXiv:2006.04388), eq. (6); ultralytics
``DFLoss`` (which clamps its targets to [0, reg_max - 1.01] before calling it).
"""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import (
    check_broadcastable_to,
    check_floating,
    check_reduction,
    compute_dtype,
    upcast,
)
from ._common import check_in_range, reduce

__all__ = ["distribution_focal_loss"]


def distribution_focal_loss(
    pred_dist: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "mean",
    weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Cross-entropy toward the two bins around a continuous target, weighted by distance.

    .. math:: \ell = -\bigl[(y_{r} - y)\log S_{y_l} + (y - y_{l})\log S_{y_r}\bigr],
              \qquad y_l = \lfloor y \rfloor,\ y_r = y_l + 1,\ S = \mathrm{softmax}(\text{pred\_dist})

    Source: GFL (Li et al. 2020, eq. 6) and ultralytics ``DFLoss``. A target equal to the last bin
    index ``bins - 1`` puts all its weight on that bin.

    Args:
        pred_dist: ``[n, bins]`` logits of the discretised distance.
        target: ``[n]`` continuous targets in ``[0, bins - 1]`` (not clamped here: out of range
            is an error).
        reduction: ``"none"`` (gives ``[n]``) | ``"mean"`` | ``"sum"``.
        weight: optional ``[n]``-broadcastable weight applied before the reduction.
    """
    check_floating("pred_dist", pred_dist)
    check_floating("target", target)
    check_reduction(reduction)
    if pred_dist.dim() != 2 or pred_dist.shape[1] < 1:
        raise ValueError(f"pred_dist: expected shape [n, bins] with bins >= 1, got {tuple(pred_dist.shape)}")
    n, bins = pred_dist.shape
    if target.shape != (n,):
        raise ValueError(f"target: expected shape ({n},) to match pred_dist {tuple(pred_dist.shape)}, "
                         f"got {tuple(target.shape)}")
    if weight is not None:
        check_floating("weight", weight)
        check_broadcastable_to("weight", weight, target.shape, "target")
    check_in_range("target", target.detach(), 0.0, float(bins - 1), "distances (bin units)")
    return dfl_in_range(pred_dist, target, reduction, weight)


def dfl_in_range(
    pred_dist: torch.Tensor, target: torch.Tensor, reduction: str = "mean", weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """:func:`distribution_focal_loss` without its checks, for tensors valid by construction (a
    loss's own ``[n, bins]`` logits and targets it clamped into ``[0, bins - 1]``): the range
    check is a host synchronization."""
    bins = pred_dist.shape[1]
    dtype = compute_dtype(pred_dist, target, weight)
    logp = torch.log_softmax(upcast(pred_dist, dtype), dim=-1)
    y = upcast(target, dtype)
    left = y.detach().long()  # floor: y >= 0
    w_left = (left + 1).to(dtype) - y
    w_right = 1 - w_left
    right = (left + 1).clamp(max=bins - 1)
    loss = -(logp.gather(1, left[:, None])[:, 0] * w_left + logp.gather(1, right[:, None])[:, 0] * w_right)
    if weight is not None:
        loss = loss * upcast(weight, dtype)
    return reduce(loss, reduction)
