"""Binary cross-entropy on probabilities and on logits, YOLOv5's BCE-blur and label smoothing.

References:
    PyTorch ``torch.nn.functional.binary_cross_entropy`` / ``binary_cross_entropy_with_logits``
    (log clamped at -100; log-sum-exp form with ``pos_weight``).
    YOLOv5 v7.0 ``utils/loss.py``: ``smooth_BCE`` and ``BCEBlurWithLogitsLoss``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .. import kernels
from .._checks import (
    check_broadcastable_to,
    check_floating,
    check_reduction,
    check_same_shape,
    compute_dtype,
    upcast,
)
from ._common import check_in_range, reduce

__all__ = ["binary_cross_entropy", "bce_with_logits", "bce_blur", "smooth_bce"]

#: YOLOv5's BCEBlurWithLogitsLoss adds this to ``alpha`` in the exponent's denominator.
BLUR_EPS = 1e-4


def _check_pair(input: torch.Tensor, target: torch.Tensor) -> None:
    check_floating("input", input)
    check_floating("target", target)
    check_same_shape("input", input, "target", target)


def _check_weight(name: str, w: Optional[torch.Tensor], input: torch.Tensor) -> None:
    if w is not None:
        check_floating(name, w)
        check_broadcastable_to(name, w, input.shape, "input")


def binary_cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Binary cross-entropy of probabilities ``input`` against ``target`` (PyTorch semantics).

    .. math:: \ell = -w\,\bigl[y \max(\log x, -100) + (1 - y) \max(\log(1 - x), -100)\bigr]

    Source: ``torch.nn.functional.binary_cross_entropy``; the log is clamped at -100 so that
    probabilities of exactly 0 or 1 give a finite loss. The value and gradient are PyTorch's own
    kernel (its gradient ``w (x - y) / max(x (1 - x), 1e-12)`` stays finite at 0 and 1).

    Args:
        input: probabilities in [0, 1], any shape, floating.
        target: same shape as ``input``, floating (soft targets allowed).
        weight: optional, broadcastable to ``input``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
    """
    _check_pair(input, target)
    _check_weight("weight", weight, input)
    check_reduction(reduction)
    check_in_range("input", input.detach(), 0.0, 1.0, "probabilities")
    dtype = compute_dtype(input, target, weight)
    x, y, w = upcast(input, dtype), upcast(target, dtype), upcast(weight, dtype)
    if w is not None:
        w = w.expand(x.shape)
    with torch.autocast(device_type=x.device.type, enabled=False):
        loss = F.binary_cross_entropy(x, y, weight=w, reduction="none")
    return reduce(loss, reduction)


def _bce_with_logits_formula(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Eager formula of :func:`bce_with_logits` (validated tensors in the compute dtype).

    The value is PyTorch's own expression ``(1 - y) x - l log(sigmoid(x))``, term for term, so it
    rounds exactly as ``torch.nn.functional.binary_cross_entropy_with_logits`` does. Its autograd
    derivative ``(1 - y) - l sigmoid(-x)`` would cancel to 0 where the true gradient is tiny
    (``x = -60, y = 0``: ``sigmoid(-60)``), so the gradient is taken from the same function
    written per sign of ``x``, whose derivative is PyTorch's ``l sigmoid(x) - p y``:
    ``x >= 0: (1 - y) x + l log1p(e^-x)``, ``x < 0: l log1p(e^x) - p y x``.
    """
    x, y = input, target
    if pos_weight is None:
        lw, pwy = None, y
    else:
        lw = 1 + (pos_weight - 1) * y  # log_weight
        pwy = pos_weight * y
    log_sig = torch.nn.functional.logsigmoid(x)
    value = (1 - y) * x - (log_sig if lw is None else lw * log_sig)
    xp = x.clamp(min=0)
    xn = x.clamp(max=0)
    sp_pos = torch.log1p(torch.exp(-xp))
    sp_neg = torch.log1p(torch.exp(xn))
    if lw is not None:
        sp_pos, sp_neg = lw * sp_pos, lw * sp_neg
    smooth = torch.where(x >= 0, (1 - y) * x + sp_pos, sp_neg - pwy * x)
    # value of `value`, gradient of `smooth` (the two are the same function)
    loss = value.detach() + (smooth - smooth.detach())
    if weight is not None:
        loss = loss * weight
    return reduce(loss, reduction)


def bce_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Binary cross-entropy on logits, with PyTorch's ``pos_weight`` (log-sum-exp form).

    .. math:: \ell = w\,\bigl[(1 - y)\,x + (1 + (p - 1)\,y)\,\mathrm{softplus}(-x)\bigr],
              \qquad \mathrm{softplus}(-x) = \max(-x, 0) + \log(1 + e^{-|x|})

    which equals :math:`-w\,[p\,y \log\sigma(x) + (1 - y)\log(1 - \sigma(x))]`.
    Source: ``torch.nn.functional.binary_cross_entropy_with_logits``. ``pos_weight`` ``p``
    broadcasts against ``input`` from the right, i.e. a ``[C]`` tensor weights the last (class)
    dimension, exactly as PyTorch does. Finite for any finite logit (``+-1e4`` included); the
    gradient is :math:`w\,[(1 + (p - 1) y)\,\sigma(x) - p\,y]`.

    Args:
        input: logits, floating, any shape.
        target: same shape, floating, usually in [0, 1].
        weight: optional, broadcastable to ``input``.
        pos_weight: optional weight of the positive term, broadcastable to ``input``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
    """
    _check_pair(input, target)
    _check_weight("weight", weight, input)
    _check_weight("pos_weight", pos_weight, input)
    check_reduction(reduction)
    if kernels.use_fused(input, target, weight, pos_weight):
        return kernels.fused_bce_with_logits(input, target, weight, pos_weight, reduction)
    dtype = compute_dtype(input, target, weight, pos_weight)
    args = (upcast(input, dtype), upcast(target, dtype))
    kwargs = dict(weight=upcast(weight, dtype), pos_weight=upcast(pos_weight, dtype), reduction=reduction)
    others = (target, weight, pos_weight)
    if input.numel() == 0 or any(t is not None and t.requires_grad for t in others):
        return _bce_with_logits_formula(*args, **kwargs)  # (the mean of nothing is 0, not NaN)
    return _BCEWithLogitsExactGrad.apply(*args, kwargs["weight"], kwargs["pos_weight"], reduction)


class _BCEWithLogitsExactGrad(torch.autograd.Function):
    """PyTorch's own op for the value (bit-identical to it), and the gradient in the form
    ``w [(1 - y) sigmoid(x) - p y sigmoid(-x)]``, which has no cancellation, so tiny gradients
    (``x = -60, y = 0``) come out exact where ``l sigmoid(x) - p y`` rounds to 0. Both equal
    :func:`_bce_with_logits_formula`; this is its fast unfused path (gradient w.r.t. ``input`` only)."""

    @staticmethod
    def forward(ctx, x, y, weight, pos_weight, reduction):  # type: ignore[override]
        ctx.save_for_backward(x, y, weight, pos_weight)
        ctx.reduction = reduction
        return torch.nn.functional.binary_cross_entropy_with_logits(
            x, y, weight=weight, pos_weight=pos_weight, reduction=reduction
        )

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, y, weight, pos_weight = ctx.saved_tensors
        pwy = y if pos_weight is None else pos_weight * y
        grad = (1 - y) * torch.sigmoid(x) - pwy * torch.sigmoid(-x)
        if weight is not None:
            grad = grad * weight
        if ctx.reduction == "mean":
            grad = grad / x.numel()
        return grad * grad_out, None, None, None, None


def _bce_blur_formula(
    input: torch.Tensor, target: torch.Tensor, alpha: float = 0.05, reduction: str = "mean"
) -> torch.Tensor:
    """Eager formula of :func:`bce_blur` (validated tensors in the compute dtype)."""
    loss = _bce_with_logits_formula(input, target, reduction="none")
    dx = torch.sigmoid(input) - target
    alpha_factor = 1 - torch.exp((dx - 1) / (alpha + BLUR_EPS))
    return reduce(loss * alpha_factor, reduction)


def bce_blur(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float = 0.05,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""YOLOv5's ``BCEBlurWithLogitsLoss``: BCE-with-logits damped where the model is confident
    about a positive that the labels call negative (a missing label).

    .. math:: \ell = \mathrm{BCE}(x, y)\,\Bigl(1 - \exp\frac{\sigma(x) - y - 1}{\alpha + 10^{-4}}\Bigr)

    Source: YOLOv5 v7.0 ``utils/loss.py`` ``BCEBlurWithLogitsLoss(alpha=0.05)``, which returns the
    mean (the default here; ``reduction`` is an addition).
    """
    _check_pair(input, target)
    check_reduction(reduction)
    if not alpha > 0:
        raise ValueError(f"alpha: expected a positive number, got {alpha!r}")
    if kernels.use_fused(input, target):
        return kernels.fused_bce_blur(input, target, alpha, reduction)
    dtype = compute_dtype(input, target)
    return _bce_blur_formula(upcast(input, dtype), upcast(target, dtype), alpha=alpha, reduction=reduction)


def smooth_bce(eps: float = 0.1) -> Tuple[float, float]:
    r"""YOLOv5's label smoothing for BCE targets: ``(positive, negative) = (1 - eps/2, eps/2)``.

    Source: YOLOv5 v7.0 ``utils/loss.py`` ``smooth_BCE`` (https://github.com/ultralytics/yolov3/issues/238).
    """
    eps = float(eps)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps: expected a number in [0, 1], got {eps!r}")
    return 1.0 - 0.5 * eps, 0.5 * eps
