"""Drop-in for ultralytics 8.4's OBB criterion: :class:`OBBLoss` (``v8OBBLoss``, or
``E2ELoss(v8OBBLoss)`` for YOLO26-OBB heads), computed by :class:`detloss.losses.obb.YOLOv8OBBLoss`.

It reads what ``v8OBBLoss`` reads (see :mod:`._model`): the common fields and ``model.args.angle``.
``preds``: ``boxes (B, 4 reg_max, A)``, ``scores (B, nc, A)``, ``angle (B, 1, A)`` (radians:
activated by YOLOv8 / YOLO11 ``OBB`` heads, raw for ``OBB26`` heads), ``feats``; ``batch``:
``batch_idx``, ``cls``, ``bboxes (N, 5)`` (normalized xywh + angle in radians).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ..._checks import compute_dtype, upcast
from ...losses.obb import HEAD_ANGLE_RANGE, OBBInputs, YOLOv8OBBLoss
from ._model import ModelInfo, UltralyticsCriterion, batch_rows, hyp, levels_of
from ._swap import register_criterion
from .detect import UltralyticsDetectBranch, _head_output

__all__ = ["OBBLoss", "UltralyticsOBBBranch"]


class UltralyticsOBBBranch(UltralyticsDetectBranch, YOLOv8OBBLoss):
    """:class:`~detloss.losses.obb.YOLOv8OBBLoss` called with one head's outputs as ultralytics'
    head emits them and the dataloader's batch (``branch(preds, batch)``); only the parsing
    differs (as :class:`~detloss.integrations.ultralytics.detect.UltralyticsDetectBranch`: no
    per-level concatenation, no finiteness check)."""

    def check(self, preds: Mapping[str, Any], batch: Mapping[str, Any]) -> OBBInputs:  # type: ignore[override]
        if not isinstance(preds, Mapping):
            raise TypeError(f"preds: expected the head's outputs dict, got {type(preds).__name__}")
        heads = [_head_output(preds, "boxes", 4 * self.reg_max, f"4 * reg_max {self.reg_max}"),
                 _head_output(preds, "scores", self.num_classes, f"nc {self.num_classes}"),
                 _head_output(preds, "angle", 1, "the angle")]
        levels = levels_of(preds.get("feats"), self.strides)
        want = (heads[0].shape[0], sum(h * w for h, w, _ in levels))
        for key, t in zip(("boxes", "scores", "angle"), heads):
            if (t.shape[0], t.shape[2]) != want or t.device != heads[0].device:
                raise ValueError(f"preds[{key!r}]: expected [{want[0]}, {t.shape[1]}, {want[1]}] on {heads[0].device} "
                                 f"(A = the feats' points), got {tuple(t.shape)} on {t.device}")
        self.check_angle_range(heads[2], heads[2].dtype, "preds['angle']")  # OBB heads: (sigmoid - 1/4) pi
        dt = compute_dtype(*heads)
        boxes, scores, angle = (upcast(t, dt).permute(0, 2, 1) for t in heads)
        return self.obb_inputs(levels, boxes, scores, angle, batch_rows(batch, self.target_device, box_dim=5))


@register_criterion("OBBModel")
class OBBLoss(UltralyticsCriterion):
    """``loss, items = OBBLoss(model)(preds, batch)``: ultralytics' ``v8OBBLoss`` (items
    box_loss, cls_loss, dfl_loss | l1_loss, angle_loss), end-to-end for heads with a one-to-one
    branch (see :class:`~detloss.integrations.ultralytics.UltralyticsCriterion`)."""

    def make_branch(self, model: Any, info: ModelInfo, tal_topk: int, tal_topk2: Optional[int]) -> torch.nn.Module:
        args = model.args
        return UltralyticsOBBBranch(
            info, box=hyp(args, "box"), cls=hyp(args, "cls"), dfl=hyp(args, "dfl"), tal_topk=tal_topk, tal_topk2=tal_topk2,
            angle=hyp(args, "angle"), angle_range=None if info.head_is("OBB26") else HEAD_ANGLE_RANGE,
        ).to(info.device)
