"""Reading some rows of a head output with a gradient laid out like the output.

The losses read the positives' rows of outputs shaped ``[B, A, ...]`` (image, anchor, channels)
that are often views of the head's own layout: ultralytics 8.4's heads emit ``(B, C, A)``
tensors, read as ``[B, A, C]`` transposed views. Autograd's backward of ``t[b, a]`` writes the
gradient into a zero-filled contiguous ``[B, A, ...]`` tensor, which then has to be copied back,
transposed, into the layout of the head's tensor (for a ``[16, 64, 8400]`` box output, a 34 MB
strided copy that takes longer than the rest of the backward). :func:`gather_rows` gives the same
rows with a backward that writes into a zero-filled tensor laid out like the output
(:func:`zero_gradient`), so the gradient reaches the head's tensor without a copy.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..kernels._runtime import empty_gradient, is_functorch_wrapped

__all__ = ["zero_gradient", "gather_rows"]


def zero_gradient(shape: Sequence[int], stride: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A zero-filled tensor of ``shape``, with the strides ``stride`` when they are those of a
    permuted contiguous tensor (a view such as ``x.reshape(...).permute(...)``), else contiguous.
    On the CPU the buffer comes from :func:`detloss.kernels._runtime.empty_gradient` (marked for
    transparent huge pages): a ``torch.zeros`` of 100 MB costs more in 4 KiB first-touch page
    faults than in writing the zeros."""
    ndim = len(shape)
    order = sorted(range(ndim), key=lambda d: stride[d], reverse=True)  # memory order, outermost first
    dense = [0] * ndim  # the strides of the permuted contiguous tensor
    step = 1
    for d in reversed(order):
        dense[d] = step
        step *= shape[d]
    if any(dense[d] != stride[d] for d in range(ndim) if shape[d] > 1):
        order = list(range(ndim))  # not a permutation of a contiguous tensor: contiguous
    inner = [shape[d] for d in order]
    if device.type == "cpu" and dtype in (torch.float32, torch.float64):
        buf = empty_gradient(torch.empty((), dtype=dtype).expand(inner)).zero_()
    else:
        buf = torch.zeros(inner, dtype=dtype, device=device)
    inverse = [0] * ndim
    for i, d in enumerate(order):
        inverse[d] = i
    return buf.permute(inverse)


def _flat_view(t: Tensor) -> Optional[Tensor]:
    """``t [B, A, ...]`` as ``[B * A, ...]`` without a copy, or None when its layout has no such view."""
    if t.shape[0] > 1 and t.stride(0) != t.stride(1) * t.shape[1]:
        return None
    return t.flatten(0, 1)


def _read(t: Tensor, image: Tensor, anchor: Tensor) -> Tensor:
    flat = _flat_view(t)
    if flat is not None:
        return flat.index_select(0, image * t.shape[1] + anchor)
    return t[image, anchor]


class _GatherRows(torch.autograd.Function):
    """``apply(image, anchor, t)`` = ``t[image, anchor]``; backward: the rows' gradient added into
    one zero-filled tensor laid out like ``t`` (with torch ops, so double backward works)."""

    @staticmethod
    def forward(ctx, image: Tensor, anchor: Tensor, t: Tensor) -> Tensor:  # type: ignore[override]
        ctx.meta = (t.shape, t.stride(), t.dtype, t.device)
        ctx.save_for_backward(image, anchor)
        return _read(t, image, anchor)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        image, anchor = ctx.saved_tensors
        shape, stride, dtype, device = ctx.meta
        out = zero_gradient(shape, stride, dtype, device)
        flat = _flat_view(out)
        if flat is not None:
            flat.index_add_(0, image * shape[1] + anchor, grad.to(dtype))
        else:
            out.index_put_((image, anchor), grad.to(dtype), accumulate=True)
        return None, None, out


def gather_rows(t: Tensor, image: Tensor, anchor: Tensor) -> Tensor:
    """``t[image, anchor]`` (``[P, ...]``) for ``t [B, A, ...]`` of any layout and int64 ``[P]``
    indices; with autograd, the gradient of ``t`` is one zero-filled tensor laid out like ``t``
    (module docstring). Under a ``torch.func`` transform: plain indexing."""
    if not (t.requires_grad and torch.is_grad_enabled()) or is_functorch_wrapped(t):
        return _read(t, image, anchor)
    return _GatherRows.apply(image, anchor, t)
