"""Focal-style losses: sigmoid and softmax focal loss, quality focal loss, varifocal loss.

References:
    Lin et al. 2017, "Focal Loss for Dense Object Detection" (arXiv:1708.02002);
    torchvision.ops.sigmoid_focal_loss; YOLOv5 v7.0 ``FocalLoss`` / ``QFocalLoss``;
    Li et al. 2020, "Generalized Focal Loss" (arXiv:2006.04388), QFL;
    Zhang et al. 2021, "VarifocalNet" (arXiv:2008.13367); ultralytics ``VarifocalLoss``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import kernels
from .._checks import (
    check_broadcastable_to,
    check_floating,
    check_reduction,
    check_same_shape,
    check_tensor,
    compute_dtype,
    upcast,
)
from ..kernels.dense import safe_pow
from ._common import check_binary, check_in_range, check_unit_interval, reduce
from .cross_entropy import _safe_div, check_class_target, check_class_weight, class_dim

__all__ = ["sigmoid_focal_loss", "softmax_focal_loss", "quality_focal_loss", "varifocal_loss"]


def _check_gamma(gamma: float) -> float:
    gamma = float(gamma)
    if not gamma >= 0:
        raise ValueError(f"gamma: expected a number >= 0, got {gamma!r}")
    return gamma


def _check_logits_targets(input: torch.Tensor, target: torch.Tensor, target_name: str = "target") -> None:
    check_floating("input", input)
    check_floating(target_name, target)
    check_same_shape("input", input, target_name, target)
    check_in_range(target_name, target, 0.0, 1.0, "values")


def sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    pos_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    r"""Sigmoid focal loss (torchvision semantics).

    .. math:: p_t = p\,y + (1 - p)(1 - y),\quad \alpha_t = \alpha\,y + (1 - \alpha)(1 - y),\quad
              \ell = \alpha_t\,(1 - p_t)^\gamma\,\mathrm{BCE}(x, y)

    with :math:`p = \sigma(x)`. ``alpha`` lies in [0, 1], or is -1 to disable the :math:`\alpha_t`
    factor (torchvision's rule: anything else is a ValueError); targets may be soft (in [0, 1]).
    Source: Lin et al. 2017 (arXiv:1708.02002), code as ``torchvision.ops.sigmoid_focal_loss``
    (defaults alpha=0.25, gamma=2, reduction="none").
    With ``gamma=1.5`` and the same alpha it is YOLOv5's and ultralytics' ``FocalLoss``
    (ultralytics switches alpha off for ``alpha <= 0``: pass ``alpha=-1`` for its ``alpha=0``).
    ``pos_weight`` (optional, broadcastable to ``input``) goes to the BCE term as in
    :func:`bce_with_logits`: YOLOv5's ``FocalLoss`` wraps ``BCEWithLogitsLoss(pos_weight=...)``.
    """
    _check_logits_targets(input, target)
    check_reduction(reduction)
    gamma = _check_gamma(gamma)
    alpha = check_unit_interval("alpha", alpha, sentinels=(-1.0,))
    if pos_weight is not None:
        check_floating("pos_weight", pos_weight)
        check_broadcastable_to("pos_weight", pos_weight, input.shape, "input")
    compiled = kernels.use_fused(input, target, pos_weight)
    return kernels.fused_sigmoid_focal_loss(input, target, alpha, gamma, reduction, pos_weight, compiled=compiled)


def softmax_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    alpha: float = 0.25,
    gamma: float = 2.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Softmax (multi-class) focal loss on class indices.

    .. math:: \ell = -\alpha\,w_y\,(1 - p_y)^\gamma \log p_y, \qquad p = \mathrm{softmax}(x)

    Source: Lin et al. 2017 (arXiv:1708.02002), the multi-class form, with mmcv's
    ``softmax_focal_loss`` defaults (gamma=2, alpha=0.25, a scalar in [0, 1] applied to every class).
    Shapes, ``weight``, ``ignore_index`` and the weighted ``"mean"`` follow
    :func:`detloss.functional.cross_entropy`, so ``gamma=0, alpha=1`` gives exactly the
    cross-entropy (mmcv divides by N instead; the two agree without weights or ignored entries).
    """
    check_floating("input", input)
    check_tensor("target", target)
    check_reduction(reduction)
    gamma = _check_gamma(gamma)
    alpha = check_unit_interval("alpha", alpha)
    cdim = class_dim(input)
    check_class_weight(weight, input.shape[cdim])
    safe_target, ignore = check_class_target(input, target, ignore_index)
    dtype = compute_dtype(input, weight)
    x, w = upcast(input, dtype), upcast(weight, dtype)
    logp_y = torch.log_softmax(x, dim=cdim).gather(cdim, safe_target.unsqueeze(cdim)).squeeze(cdim)
    keep = (~ignore).to(dtype)
    w_t = keep if w is None else w[safe_target] * keep
    mod = safe_pow((1 - logp_y.exp()).clamp(min=0), gamma)
    loss = -alpha * mod * logp_y * w_t
    if reduction == "mean":
        return _safe_div(loss.sum(), w_t.sum())
    return reduce(loss, reduction)


def quality_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    gamma: float = 2.0,
    alpha: Optional[float] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Quality focal loss: BCE toward a soft (IoU-quality) target, modulated by the distance.

    .. math:: \ell = \alpha_t\,|y - \sigma(x)|^\gamma\,\mathrm{BCE}(x, y),\qquad
              \alpha_t = \alpha\,y + (1 - \alpha)(1 - y)\ \ (1 \text{ when alpha is None})

    ``alpha=None, gamma=2`` is GFL's QFL (Li et al. 2020, arXiv:2006.04388, with the dense
    target: the quality score at the labelled class, 0 elsewhere; GFL names gamma "beta");
    ``alpha=0.25, gamma=1.5`` is YOLOv5 v7.0's ``QFocalLoss``; ``alpha`` is None or in [0, 1].
    """
    _check_logits_targets(input, target)
    check_reduction(reduction)
    gamma = _check_gamma(gamma)
    alpha = None if alpha is None else check_unit_interval("alpha", alpha)
    compiled = kernels.use_fused(input, target)
    return kernels.fused_quality_focal_loss(input, target, gamma, alpha, reduction, compiled=compiled)


def varifocal_loss(
    input: torch.Tensor,
    target_score: torch.Tensor,
    label: torch.Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Varifocal loss: BCE toward the IoU-aware score, positives weighted by their score and
    negatives down-weighted by :math:`\alpha\,p^\gamma`.

    .. math:: \ell = \bigl[\alpha\,\sigma(x)^\gamma\,(1 - l) + q\,l\bigr]\ \mathrm{BCE}(x, q)

    with :math:`q` = ``target_score`` (in [0, 1]) and :math:`l` = ``label`` (1 at the positive's
    class, else 0: any other value is a ValueError). Source: Zhang et al. 2021, VarifocalNet
    (arXiv:2008.13367), in the weighting of ultralytics' ``VarifocalLoss`` (alpha=0.75, gamma=2;
    the weight is not detached); ``alpha``, the weight of the negatives, lies in [0, 1].
    ``"none"`` gives the elementwise loss; ultralytics' value is
    ``varifocal_loss(..., reduction="none").mean(1).sum()``.
    """
    check_floating("input", input)
    _check_logits_targets(input, target_score, "target_score")
    check_tensor("label", label)
    if label.is_complex():
        raise TypeError(f"label: expected a real (0/1) tensor, got dtype {label.dtype}")
    check_same_shape("input", input, "label", label)
    check_binary("label", label)
    check_reduction(reduction)
    gamma = _check_gamma(gamma)
    alpha = check_unit_interval("alpha", alpha)
    compiled = kernels.use_fused(input, target_score, label)
    return kernels.fused_varifocal_loss(input, target_score, label, alpha, gamma, reduction, compiled=compiled)
