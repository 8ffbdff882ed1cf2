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
from ..kernels.dense import BLUR_EPS
from ._common import check_in_range, reduce

__all__ = ["binary_cross_entropy", "bce_with_logits", "bce_blur", "smooth_bce", "BLUR_EPS"]


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
        target: same shape as ``input``, floating, in [0, 1] (soft targets allowed).
        weight: optional, broadcastable to ``input``.
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
    """
    _check_pair(input, target)
    _check_weight("weight", weight, input)
    check_reduction(reduction)
    check_in_range("input", input, 0.0, 1.0, "probabilities")
    check_in_range("target", target, 0.0, 1.0, "values")
    dtype = compute_dtype(input, target, weight)
    x, y, w = upcast(input, dtype), upcast(target, dtype), upcast(weight, dtype)
    if w is not None:
        w = w.expand(x.shape)
    with torch.autocast(device_type=x.device.type, enabled=False):
        loss = F.binary_cross_entropy(x, y, weight=w, reduction="none")
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
    Source: ``torch.nn.functional.binary_cross_entropy_with_logits``, whose value this equals to
    rounding. ``pos_weight`` ``p`` broadcasts against ``input`` from the right, i.e. a ``[C]``
    tensor weights the last (class) dimension, exactly as PyTorch does. Finite for any finite
    logit (``+-1e4`` included); the gradient
    :math:`w\,[(1 + (p - 1) y)\,\sigma(x) - p\,y] = w\,[(1 - y)\,\sigma(x) - p\,y\,\sigma(-x)]`
    is computed in the second form, which does not cancel: where it is tiny (``x = -60, y = 0``:
    :math:`\sigma(-60) \approx 8.8 \cdot 10^{-27}`) it is exact, not 0. Computed by
    :mod:`detloss.kernels` (the one BCE core of the dense losses), compiled for large inputs.

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
    compiled = kernels.use_fused(input, target, weight, pos_weight)
    return kernels.fused_bce_with_logits(input, target, weight, pos_weight, reduction, compiled=compiled)


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
    mean (the default here; ``reduction`` is an addition). ``target`` must lie in [0, 1] (outside
    it the damping factor exceeds 1 or the loss turns negative).
    """
    _check_pair(input, target)
    check_reduction(reduction)
    if not alpha > 0:
        raise ValueError(f"alpha: expected a positive number, got {alpha!r}")
    check_in_range("target", target, 0.0, 1.0, "values")
    compiled = kernels.use_fused(input, target)
    return kernels.fused_bce_blur(input, target, float(alpha), reduction, compiled=compiled)


def smooth_bce(eps: float = 0.1) -> Tuple[float, float]:
    r"""YOLOv5's label smoothing for BCE targets: ``(positive, negative) = (1 - eps/2, eps/2)``.

    Source: YOLOv5 v7.0 ``utils/loss.py`` ``smooth_BCE`` (https://github.com/ultralytics/yolov3/issues/238).
    """
    eps = float(eps)
    if not 0.0 <= eps <= 1.0:
        raise ValueError(f"eps: expected a number in [0, 1], got {eps!r}")
    return 1.0 - 0.5 * eps, 0.5 * eps
