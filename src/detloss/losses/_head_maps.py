"""The per-level outputs of an anchor-free dense head (YOLOv8 / YOLO11), read in place.

A head gives, per level ``l``, a map ``[B, 4 * reg_max + nc, H_l, W_l]``: the box-side
distributions, then the class logits. ultralytics' ``v8DetectionLoss`` concatenates the levels
and permutes them into ``[B, A, 4 * reg_max]`` and ``[B, A, nc]`` copies; then its class BCE,
its decoding and autograd's way back through the concatenation each pass over all of them again.
:class:`HeadMaps` keeps the maps as they are (``[B, 4 * reg_max + nc, H_l * W_l]`` views) and
gives the loss what it reads, each in one pass:

- :meth:`HeadMaps.box_channels`: level ``l``'s box channels as ``[B, H_l * W_l, 4 * reg_max]``
  (a view), what :meth:`detloss.YOLOv8Loss.decode_boxes` decodes;
- :meth:`HeadMaps.scores`: the class probabilities ``[B, A, nc]`` (no gradient), and
  :meth:`HeadMaps.gather_scores` those of some entries only, which is what the task-aligned
  assigner's candidate path reads;
- :func:`head_terms`: in one autograd node, the class BCE against one-hot soft targets (fused pass
  :func:`detloss.kernels.onehot.onehot_bce_into` over the class channels, whose gradient is written
  straight into the maps' gradient, the box channels' part zero-filled) and the box channels of the positives ``[P, 4 * reg_max]``,
  whose gradient backward adds into the same buffer: the whole gradient of the head is one
  allocation, written once;
- :meth:`HeadMaps.concat_box_channels` / :meth:`HeadMaps.concat_logits`: the concatenated forms,
  for a step that wants them (built only then).
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..kernels._runtime import empty_gradient
from ..kernels.onehot import onehot_bce_into

__all__ = ["HeadMaps", "head_terms"]

#: Class logits of one level (all images) from which :func:`head_terms` runs the class BCE image by
#: image (each image's class channels one contiguous block, read and written in place) instead of in
#: one call over the batch-strided view of all images. That one call stores the gradient in a
#: level-sized buffer before copying it into the strided view (Inductor collapses the view's loop
#: differently from the labels' broadcast), which above this size costs more than a call per
#: image; below it the one call is faster. 2**21 elements (8 MiB of float32): measured on YOLOv8
#: heads (80 classes; batch 8 at 320 px and batch 16 at 640 px), where 2**19 and 2**23 were slower.
PER_IMAGE_NUMEL = 1 << 21


class HeadMaps:
    """Per-level head outputs as ``[B, 4 * reg_max + nc, H_l * W_l]`` maps (views of the given
    tensors where their dtype is the compute dtype), anchors numbered level by level, row-major."""

    def __init__(self, maps: Sequence[Tensor], reg_max: int, num_classes: int) -> None:
        self.maps: List[Tensor] = list(maps)
        self.reg_max = reg_max
        self.num_classes = num_classes
        self.sizes = [int(m.shape[2]) for m in self.maps]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.num_anchors = sum(self.sizes)
        self.batch_size = int(self.maps[0].shape[0])

    @property
    def box_dim(self) -> int:
        return 4 * self.reg_max

    def box_channels(self, level: int) -> Tensor:
        """``[B, H_l * W_l, 4 * reg_max]``: level ``level``'s box channels (a strided view)."""
        return self.maps[level][:, : self.box_dim].transpose(1, 2)

    def concat_box_channels(self) -> Tensor:
        """``[B, A, 4 * reg_max]`` contiguous, with autograd to the maps."""
        return torch.cat([m[:, : self.box_dim] for m in self.maps], 2).permute(0, 2, 1).contiguous()

    def concat_logits(self) -> Tensor:
        """``[B, A, nc]`` (a view of a contiguous ``[B, nc, A]`` copy), with autograd to the maps."""
        return torch.cat([m[:, self.box_dim :] for m in self.maps], 2).permute(0, 2, 1)

    def scores(self) -> Tensor:
        """Class probabilities ``[B, A, nc]`` (a view of ``[B, nc, A]``), without gradient."""
        m0 = self.maps[0]
        out = torch.empty((self.batch_size, self.num_classes, self.num_anchors), dtype=m0.dtype, device=m0.device)
        with torch.no_grad():
            for m, off, n in zip(self.maps, self.offsets, self.sizes):
                torch.sigmoid(m[:, self.box_dim :], out=out[:, :, off : off + n])
        return out.permute(0, 2, 1)

    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(B, A, nc)``: the shape of :meth:`scores`."""
        return (self.batch_size, self.num_anchors, self.num_classes)

    @property
    def dtype(self) -> torch.dtype:
        return self.maps[0].dtype

    @property
    def device(self) -> torch.device:
        return self.maps[0].device

    def gather_scores(self, image: Tensor, anchor: Tensor, cls: Tensor) -> Tensor:
        """``scores()[image, anchor, cls]`` for int64 ``[n]`` indices, read from the maps at those
        entries only (the same values: the sigmoid of each logit), without gradient."""
        level, local = self.locate(anchor)
        out = self.maps[0].new_zeros(anchor.shape)
        with torch.no_grad():
            for lvl, (m, n) in enumerate(zip(self.maps, self.sizes)):
                flat = (image * m.shape[1] + self.box_dim + cls) * n + local.clamp(max=n - 1)
                out = torch.where(level == lvl, torch.take(m.detach(), flat), out)
        return out.sigmoid_()

    def locate(self, pred_index: Tensor) -> Tuple[Tensor, Tensor]:
        """Level and index within the level ``[P]`` of anchors ``pred_index`` (no synchronization)."""
        ends = torch.tensor([o + n for o, n in zip(self.offsets, self.sizes)], device=pred_index.device)
        level = torch.searchsorted(ends, pred_index, right=True)
        starts = torch.tensor(self.offsets, device=pred_index.device)
        return level, pred_index - starts[level]


def head_terms(
    head: HeadMaps,
    batch_index: Tensor,
    pred_index: Tensor,
    class_targets: Optional[Tuple[Tensor, Tensor]],
    class_weights: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``(box channels of the positives [P, 4 * reg_max], class BCE sum)`` from the head maps,
    differentiable (one autograd node, see the module docstring).

    ``class_targets``: ``(labels [B, A], scores [B, A])``, the one-hot soft targets of every anchor
    (``target[b, a, c] = scores[b, a]`` where ``c == labels[b, a]``); None: no class term (the sum
    comes back None). ``class_weights``: optional ``[nc]`` weights of the classes' BCE."""
    m0 = head.maps[0]
    dt, dev = m0.dtype, m0.device
    level, local = head.locate(pred_index)
    spec = _Spec(head, batch_index, level, local)
    if class_targets is None:
        rows = _HeadTerms.apply(spec, None, *head.maps)[0]
        return rows, None
    labels, scores = class_targets
    chan = torch.arange(head.num_classes, dtype=dt, device=dev)
    weight = torch.ones(head.num_classes, dtype=dt, device=dev) if class_weights is None else class_weights.to(dt)
    cls = (labels.to(dt)[:, None], scores.to(dt)[:, None], chan[None, :, None], weight[None, :, None])
    rows, total = _HeadTerms.apply(spec, cls, *head.maps)
    return rows, total


class _Spec:
    """Where the positives lie (image, level, index within the level) and the flat offsets of the
    levels in the one gradient buffer of all maps."""

    def __init__(self, head: HeadMaps, batch_index: Tensor, level: Tensor, local: Tensor) -> None:
        self.head = head
        self.batch_index, self.level, self.local = batch_index, level, local
        no = head.box_dim + head.num_classes
        self.level_numel = [head.batch_size * no * n for n in head.sizes]
        self.level_start = [sum(self.level_numel[:i]) for i in range(len(self.level_numel))]

    def flat_rows(self) -> Tensor:
        """int64 ``[P, 4 * reg_max]``: each positive's box channels in the flat gradient buffer."""
        head, dev = self.head, self.level.device
        no = head.box_dim + head.num_classes
        start = torch.tensor(self.level_start, device=dev)[self.level]
        size = torch.tensor(head.sizes, device=dev)[self.level]
        base = start + self.batch_index * no * size + self.local
        return base[:, None] + torch.arange(head.box_dim, device=dev)[None, :] * size[:, None]


class _HeadTerms(torch.autograd.Function):
    """Forward: the positives' box channels and (with ``cls``) the one-hot class BCE sum, whose
    gradient goes into a buffer holding the gradient of every map. Backward: that buffer's class
    part scaled by the sum's ``grad_output``, the positives' row gradients added at their box
    channels; the maps' gradients are views of it."""

    @staticmethod
    def forward(ctx, spec: _Spec, cls, *maps: Tensor):  # type: ignore[override]
        head = spec.head
        bd = head.box_dim
        rows = maps[0].new_zeros((spec.batch_index.shape[0], bd))
        channel = torch.arange(bd, device=rows.device)
        for lvl, m in enumerate(maps):
            no, n = m.shape[1], m.shape[2]
            first = spec.batch_index * (no * n) + spec.local.clamp(max=n - 1)  # channel 0 of the row
            rows = torch.where((spec.level == lvl)[:, None], torch.take(m, first[:, None] + channel * n), rows)
        ctx.spec = spec
        ctx.shapes = [m.shape for m in maps]
        ctx.buffer = None
        total = None
        if cls is not None:
            labels, scores, chan, weight = cls
            buffer = _empty_flat(maps[0], sum(spec.level_numel))
            one = torch.ones((), dtype=maps[0].dtype, device=maps[0].device)
            parts = []
            for lvl, m in enumerate(maps):
                off, n = head.offsets[lvl], head.sizes[lvl]
                out = _level_view(buffer, spec, lvl, m.shape)
                out[:, :bd].zero_()  # the box channels' gradient: 0 but at the positives (backward)
                lab, sc = labels[..., off : off + n], scores[..., off : off + n]
                if m.shape[0] > 1 and m.shape[0] * head.num_classes * n >= PER_IMAGE_NUMEL:
                    # image by image, the class channels of one image are one contiguous block: the
                    # compiled pass reads and writes them in place (the batch-strided view of all
                    # images makes it copy the logits and stage the gradient, two level-sized buffers)
                    parts.extend(
                        onehot_bce_into(out[b, bd:], m[b, bd:], lab[b], sc[b], chan[0], weight[0], one)
                        for b in range(m.shape[0])
                    )
                else:
                    parts.append(onehot_bce_into(out[:, bd:], m[:, bd:], lab, sc, chan, weight, one))
            total = torch.stack(parts).sum()
            ctx.buffer = buffer
        ctx.has_cls = cls is not None
        return rows, (total if total is not None else rows.new_zeros(()))

    @staticmethod
    def backward(ctx, grad_rows: Tensor, grad_total: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(
                "YOLOv8Loss's fused head pass computes its gradient in closed form and does not support double "
                "backward (create_graph=True); set DETLOSS_FUSED=0 to use the plain autograd formula"
            )
        spec = ctx.spec
        head = spec.head
        bd = head.box_dim
        buffer, ctx.buffer = ctx.buffer, None
        if buffer is None:
            dt, dev = grad_rows.dtype, grad_rows.device
            buffer = torch.zeros(sum(spec.level_numel), dtype=dt, device=dev)
        elif ctx.has_cls and not (grad_total.device.type == "cpu" and float(grad_total) == 1.0):
            for lvl, shape in enumerate(ctx.shapes):
                _level_view(buffer, spec, lvl, shape)[:, bd:].mul_(grad_total)
        if grad_rows.shape[0]:
            # the box channels hold 0 so far and every positive's rows are its own: write, not add
            buffer.index_put_((spec.flat_rows().reshape(-1),), grad_rows.reshape(-1))
        return (None, None) + tuple(_level_view(buffer, spec, lvl, shape) for lvl, shape in enumerate(ctx.shapes))


def _level_view(buffer: Tensor, spec: _Spec, level: int, shape: torch.Size) -> Tensor:
    start, numel = spec.level_start[level], spec.level_numel[level]
    return buffer[start : start + numel].view(shape)


def _empty_flat(like: Tensor, numel: int) -> Tensor:
    return empty_gradient(like.new_empty(()).expand(numel))
