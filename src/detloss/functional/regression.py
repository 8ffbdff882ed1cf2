"""Elementwise regression losses with torch.nn.functional's semantics.

Reference: ``torch.nn.functional.smooth_l1_loss`` / ``l1_loss`` / ``mse_loss``; smooth L1 as in
Girshick 2015, "Fast R-CNN" (arXiv:1504.08083).
"""
from __future__ import annotations

import torch

from .._checks import check_floating, check_reduction, check_same_shape, compute_dtype, upcast
from ._common import reduce

__all__ = ["smooth_l1_loss", "l1_loss", "mse_loss"]


def _prepare(input: torch.Tensor, target: torch.Tensor, reduction: str):
    check_floating("input", input)
    check_floating("target", target)
    check_same_shape("input", input, "target", target)
    check_reduction(reduction)
    dtype = compute_dtype(input, target)
    return upcast(input, dtype), upcast(target, dtype)


def smooth_l1_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    beta: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Smooth L1 (Huber-like) loss.

    .. math:: \ell = \begin{cases} 0.5\,d^2/\beta & |d| < \beta \\ |d| - 0.5\,\beta & \text{else}
              \end{cases},\qquad d = x - y

    ``beta = 0`` is the L1 loss. Source: Girshick 2015 (Fast R-CNN), code as
    ``torch.nn.functional.smooth_l1_loss`` (default beta=1).
    """
    x, y = _prepare(input, target, reduction)
    beta = float(beta)
    if not beta >= 0:
        raise ValueError(f"beta: expected a number >= 0, got {beta!r}")
    d = (x - y).abs()
    if beta == 0:
        return reduce(d, reduction)
    loss = torch.where(d < beta, 0.5 * d * d / beta, d - 0.5 * beta)
    return reduce(loss, reduction)


def l1_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""L1 loss :math:`\ell = |x - y|` (``torch.nn.functional.l1_loss``)."""
    x, y = _prepare(input, target, reduction)
    return reduce((x - y).abs(), reduction)


def mse_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Squared error :math:`\ell = (x - y)^2` (``torch.nn.functional.mse_loss``)."""
    x, y = _prepare(input, target, reduction)
    return reduce((x - y) ** 2, reduction)
