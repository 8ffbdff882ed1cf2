"""From the training outputs of ultralytics 8.4 heads (``(B, C, A)`` tensors over all anchors,
``feats`` for the level sizes) to the per-level maps detloss's losses take; shared by the task
criteria (OBB, pose, segmentation)."""
from __future__ import annotations

from typing import Any, List, Mapping, Sequence

import torch
from torch import Tensor

from ...anchors import Level

__all__ = ["pred_tensor", "level_maps", "box_class_maps"]


def pred_tensor(preds: Mapping[str, Any], key: str, channels: int = -1, what: str = "") -> Tensor:
    """``preds[key]``, a ``(B, C, A)`` tensor (``C == channels`` unless -1), with errors naming the key."""
    if key not in preds:
        raise ValueError(f"preds: expected a {key!r} entry (the head's training outputs), got keys {sorted(preds)}")
    t = preds[key]
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"preds[{key!r}]: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.ndim != 3 or (channels >= 0 and t.shape[1] != channels):
        want = f"(B, {channels}{what}, A)" if channels >= 0 else "(B, C, A)"
        raise ValueError(f"preds[{key!r}]: expected shape {want}, got {tuple(t.shape)}")
    return t


def level_maps(name: str, flat: Tensor, levels: Sequence[Level]) -> List[Tensor]:
    """``(B, C, A)`` -> per-level views ``[B, C, h, w]`` (anchors level by level, row-major)."""
    sizes = [h * w for h, w, _ in levels]
    if flat.shape[-1] != sum(sizes):
        raise ValueError(f"{name}: expected {sum(sizes)} anchors (the levels of preds['feats']), got {flat.shape[-1]}")
    return [t.unflatten(2, (h, w)) for t, (h, w, _) in zip(flat.split(sizes, 2), levels)]


def box_class_maps(preds: Mapping[str, Any], levels: Sequence[Level], reg_max: int, nc: int) -> List[Tensor]:
    """``preds['boxes']`` ``(B, 4 reg_max, A)`` and ``preds['scores']`` ``(B, nc, A)`` -> the
    per-level ``[B, 4 reg_max + nc, h, w]`` maps of :class:`~detloss.losses.yolov8.YOLOv8Loss`."""
    boxes = pred_tensor(preds, "boxes", 4 * reg_max, f" = 4 * reg_max {reg_max}")
    scores = pred_tensor(preds, "scores", nc, " = nc")
    return [torch.cat(pair, 1) for pair in zip(level_maps("preds['boxes']", boxes, levels), level_maps("preds['scores']", scores, levels))]
