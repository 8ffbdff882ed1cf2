"""The extra training outputs of ultralytics 8.4's OBB, pose and segmentation heads (``(B, C, A)``
over all anchors), read as the task losses take them (``[B, A, C]`` views); shared by their drop-in
criteria."""
from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor

from ..._checks import upcast
from ...losses.yolov8 import YOLOv8Inputs
from .detect import _head_output

__all__ = ["anchor_major"]


def anchor_major(preds: Mapping[str, Any], key: str, channels: int, what: str, base: YOLOv8Inputs) -> Tensor:
    """``preds[key]`` ``(B, channels, A)`` as a ``[B, A, channels]`` view in the compute dtype of the
    detection inputs ``base`` (same batch and anchors as the head's boxes)."""
    t = _head_output(preds, key, channels, what)
    n_anchor = base.pred_dist.shape[1]
    if t.shape[0] != base.batch_size or t.shape[2] != n_anchor:
        raise ValueError(f"preds[{key!r}]: expected [{base.batch_size}, {channels}, {n_anchor}] like preds['boxes'], got {tuple(t.shape)}")
    if t.device != base.device:
        raise ValueError(f"preds[{key!r}]: expected device {base.device} as preds['boxes'], got {t.device}")
    return upcast(t, base.dtype).permute(0, 2, 1)
