"""Softmax cross-entropy with PyTorch's exact semantics (class indices or probabilities).

Reference: ``torch.nn.functional.cross_entropy`` (log_softmax + weighted NLL; label smoothing as
in Szegedy et al. 2016, "Rethinking the Inception Architecture", mixed as PyTorch does).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import check_floating, check_reduction, check_tensor, compute_dtype, upcast
from ._common import first_bad, reduce, values

__all__ = ["cross_entropy"]


def class_dim(input: torch.Tensor) -> int:
    """The class dimension: 0 for an unbatched ``[C]`` input, else 1 (``[N, C, d1, ...]``)."""
    if input.dim() == 0:
        raise ValueError("input: expected a tensor of shape [C] or [N, C, d1, ...], got a 0-d tensor")
    return 0 if input.dim() == 1 else 1


def check_class_weight(weight: Optional[torch.Tensor], num_classes: int) -> None:
    if weight is None:
        return
    check_floating("weight", weight)
    if weight.shape != (num_classes,):
        raise ValueError(
            f"weight: expected a per-class tensor of shape ({num_classes},), got {tuple(weight.shape)}"
        )


def check_class_target(
    input: torch.Tensor, target: torch.Tensor, ignore_index: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate integer class targets; return ``(safe_target, ignore_mask)`` with ignored entries
    replaced by class 0 so that they can be gathered."""
    cdim = class_dim(input)
    expected = input.shape[:cdim] + input.shape[cdim + 1:]
    if target.shape != expected:
        raise ValueError(
            f"target: expected class indices of shape {tuple(expected)} for input of shape "
            f"{tuple(input.shape)}, got {tuple(target.shape)}"
        )
    if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        raise TypeError(f"target: expected an integer tensor of class indices, got dtype {target.dtype}")
    target = target.long()
    num_classes = input.shape[cdim]
    seen = values(target)
    bad = (seen != ignore_index) & ((seen < 0) | (seen >= num_classes))
    if bad.numel() and bool(bad.any()):
        pos = first_bad(bad)
        raise ValueError(
            f"target: expected class indices in [0, {num_classes - 1}] or ignore_index={ignore_index}, "
            f"got {int(seen[pos])} at index {pos}"
        )
    ignore = target == ignore_index
    return target.masked_fill(ignore, 0), ignore


def _weight_view(weight: torch.Tensor, input: torch.Tensor, cdim: int) -> torch.Tensor:
    shape = [1] * input.dim()
    shape[cdim] = -1
    return weight.view(shape)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, and 0 where den == 0 (PyTorch would give NaN: every target ignored)."""
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), num * 0)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Softmax cross-entropy, for class indices or for class probabilities.

    With :math:`\log p = \mathrm{log\_softmax}(x)` over the class dimension and
    :math:`\varepsilon` = ``label_smoothing``, :math:`C` classes:

    * class indices :math:`y`:
      :math:`\ell = (1 - \varepsilon)\,(-w_y \log p_y) + \frac{\varepsilon}{C} \sum_c -w_c \log p_c`;
      ``"mean"`` divides the sum by :math:`\sum w_y` over non-ignored elements (PyTorch's weighted
      mean); entries equal to ``ignore_index`` contribute 0.
    * probabilities :math:`q` (floating target of the input's shape):
      :math:`q' = (1 - \varepsilon) q + \varepsilon / C`, :math:`\ell = -\sum_c w_c q'_c \log p_c`;
      ``"mean"`` divides by the number of elements (not by the weights), as PyTorch does.

    Source: ``torch.nn.functional.cross_entropy``; the one deviation is that a ``"mean"`` over
    nothing (empty input, every target ignored) is 0 instead of NaN.

    Args:
        input: logits ``[N, C, d1, ...]`` or unbatched ``[C]``.
        target: integer class indices ``[N, d1, ...]`` (0-d for ``[C]``), or probabilities of the
            input's shape.
        weight: optional per-class weight ``[C]``.
        ignore_index: class index to ignore (class-index targets only).
        label_smoothing: in [0, 1].
        reduction: ``"none"`` | ``"mean"`` | ``"sum"``.
    """
    check_floating("input", input)
    check_tensor("target", target)
    check_reduction(reduction)
    cdim = class_dim(input)
    num_classes = input.shape[cdim]
    check_class_weight(weight, num_classes)
    label_smoothing = float(label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing: expected a number in [0, 1], got {label_smoothing!r}")
    soft = target.is_floating_point()
    if soft and target.shape != input.shape:
        raise ValueError(
            f"target: expected class probabilities of the input's shape {tuple(input.shape)} "
            f"or integer class indices, got a floating tensor of shape {tuple(target.shape)}"
        )
    if not soft:
        safe_target, ignore = check_class_target(input, target, ignore_index)
    dtype = compute_dtype(input, target if soft else None, weight)
    x, w = upcast(input, dtype), upcast(weight, dtype)
    logp = torch.log_softmax(x, dim=cdim)

    if soft:
        q = upcast(target, dtype)
        if label_smoothing > 0:
            q = q * (1 - label_smoothing) + label_smoothing / num_classes
        if w is not None:
            q = q * _weight_view(w, x, cdim)
        loss = -(logp * q).sum(cdim)
        if reduction == "mean":
            n = max(x.numel() // max(num_classes, 1), 1) if x.numel() else 1
            return loss.sum() / n
        return reduce(loss, reduction)

    keep = (~ignore).to(dtype)
    nll = -logp.gather(cdim, safe_target.unsqueeze(cdim)).squeeze(cdim)
    w_t = keep if w is None else w[safe_target] * keep
    nll = nll * w_t
    if label_smoothing > 0:
        lw = logp if w is None else logp * _weight_view(w, x, cdim)
        smooth = -lw.sum(cdim) * keep
    if reduction == "none":
        if label_smoothing > 0:
            return (1 - label_smoothing) * nll + (label_smoothing / num_classes) * smooth
        return nll
    total = nll.sum()
    if label_smoothing > 0:
        total = (1 - label_smoothing) * total + (label_smoothing / num_classes) * smooth.sum()
    if reduction == "sum":
        return total
    return _safe_div(total, w_t.sum())
