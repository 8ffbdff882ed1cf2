"""What the grid heads' losses (YOLOv3, YOLOv5) read from the head outputs, with one gradient per level.

A head output is seen as ``[bs, na, ny, nx, no]`` (image, anchor, cell row, cell column, channel
``x, y, w, h, objectness, classes...``), in whatever memory layout it has: YOLOv5's outputs are
contiguous that way, YOLOv3's raw layer inputs ``[bs, na * no, ny, nx]`` are that shape as a
permuted view (channel planes). The losses read every cell's objectness logit and the positive
cells' rows.

Autograd through plain indexing and slicing builds, per level, a zero-filled gradient of the whole
head output for every indexing op and adds them up (on a YOLOv3 batch of 16 at 640 px, 137 MB
per copy: most of the backward's time and memory). :class:`_GatherCells` instead writes each
level's objectness gradient and its positives' gradients straight into one zero-filled tensor
laid out like that level's output, so the gradient reaches the caller's tensor without a copy.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._rows import zero_gradient

#: Channel of the objectness logit in a cell's row.
OBJ_CHANNEL = 4


def flat_cells(shape: Sequence[int], image: Tensor, anchor: Tensor, gy: Tensor, gx: Tensor) -> Tensor:
    """The cells' flat indices into the ``bs * na * ny * nx`` cells of a ``[bs, na, ny, nx, no]`` output."""
    _, na, ny, nx = shape[:4]
    return ((image * na + anchor) * ny + gy) * nx + gx


def cell_coordinates(shape: Sequence[int], flat: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`flat_cells`'s inverse: (image, anchor, gy, gx) of each flat cell index."""
    _, na, ny, nx = shape[:4]
    gx = flat % nx
    rest = torch.div(flat, nx, rounding_mode="floor")
    gy = rest % ny
    rest = torch.div(rest, ny, rounding_mode="floor")
    return torch.div(rest, na, rounding_mode="floor"), rest % na, gy, gx


def _rows_view(t: Tensor) -> Optional[Tensor]:
    """``t`` as ``[cells, no]`` without a copy, or None when its layout has no such view."""
    return t.view(-1, t.shape[-1]) if t.is_contiguous() else None


def _read(counts: Sequence[int], flat: Tensor, preds: Sequence[Tensor]) -> Tuple[List[Tensor], Tensor, List[Tensor]]:
    """``([pi[..., 4] for each level], box [P, 4], [classes [n_i, nc] for each level])``, no autograd."""
    no = preds[0].shape[-1]
    rows = preds[0].new_empty((flat.shape[0], no))
    for pi, index, dst in zip(preds, flat.split(list(counts)), rows.split(list(counts))):
        view = _rows_view(pi)
        if view is not None:
            torch.index_select(view, 0, index, out=dst)
        else:
            dst.copy_(pi[cell_coordinates(pi.shape, index)])
    objs = [pi[..., OBJ_CHANNEL].contiguous() for pi in preds]
    return objs, rows[:, :OBJ_CHANNEL].contiguous(), [r[:, OBJ_CHANNEL + 1:] for r in rows.split(list(counts))]


class _GatherCells(torch.autograd.Function):
    """``apply(counts, flat, *preds)``: ``preds`` the levels' outputs ``[bs, na, ny, nx, no]``,
    ``flat`` ``[P]`` the positives' flat cell indices into their level's cells (level after level,
    ``counts`` per level); returns ``(*objectness, box, *classes)``: every level's objectness logits
    ``[bs, na, ny, nx]``, the positives' box logits ``[P, 4]`` and, per level, their class logits
    ``[n_i, nc]``. Backward: one zero-filled gradient per level (:func:`~detloss.losses._rows.zero_gradient`), its
    objectness plane written once, the positives' rows added (a cell listed twice accumulates, as
    ``index_put`` with ``accumulate=True`` does)."""

    @staticmethod
    def forward(ctx, counts: Tuple[int, ...], flat: torch.Tensor, *preds: torch.Tensor):  # type: ignore[override]
        ctx.counts = counts
        ctx.preds_meta = [(p.shape, p.stride(), p.dtype, p.device) for p in preds]
        ctx.save_for_backward(flat)
        objs, box, classes = _read(counts, flat, preds)
        return (*objs, box, *classes)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        (flat,) = ctx.saved_tensors
        nl = len(ctx.preds_meta)
        g_objs, g_box, g_classes = grads[:nl], grads[nl], grads[nl + 1:]
        g_boxes = [None] * nl if g_box is None else g_box.split(list(ctx.counts))
        out: List[Optional[Tensor]] = []
        for i, ((shape, stride, dtype, device), index) in enumerate(zip(ctx.preds_meta, flat.split(list(ctx.counts)))):
            if not ctx.needs_input_grad[2 + i]:
                out.append(None)
                continue
            grad = zero_gradient(shape, stride, dtype, device)
            if g_objs[i] is not None:
                grad[..., OBJ_CHANNEL] = g_objs[i].to(grad.dtype)
            if index.numel() and (g_boxes[i] is not None or g_classes[i] is not None):
                # the positives' rows assembled first: adding whole rows is a few times faster
                # than adding strided column blocks
                rows = grad.new_zeros((index.shape[0], shape[-1]))
                if g_boxes[i] is not None:
                    rows[:, :OBJ_CHANNEL] = g_boxes[i]
                if g_classes[i] is not None:
                    rows[:, OBJ_CHANNEL + 1:] = g_classes[i]
                view = _rows_view(grad)
                if view is not None:
                    view.index_add_(0, index, rows)
                else:
                    grad.index_put_(cell_coordinates(shape, index), rows, accumulate=True)
            out.append(grad)
        return (None, None, *out)


def gather_cells(
    preds: Sequence[Tensor], flats: Sequence[Tensor]
) -> Tuple[List[Tensor], Tensor, List[Tensor]]:
    """Every level's objectness logits ``[bs, na, ny, nx]``, the positives' box logits ``[P, 4]``
    of all levels (level after level) and their class logits ``[n_i, nc]`` per level, from the
    outputs ``preds`` (``[bs, na, ny, nx, no]``, any layout) at the cells ``flats[i]``
    (:func:`flat_cells`); backward writes one gradient tensor per level (:class:`_GatherCells`)."""
    counts = tuple(int(f.numel()) for f in flats)
    flat = torch.cat(list(flats)) if len(flats) > 1 else flats[0]
    if any(p.requires_grad for p in preds) and torch.is_grad_enabled():
        nl = len(preds)
        out = _GatherCells.apply(counts, flat, *preds)
        return list(out[:nl]), out[nl], list(out[nl + 1:])
    return _read(counts, flat, preds)
