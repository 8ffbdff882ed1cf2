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

from ...losses.obb import HEAD_ANGLE_RANGE, YOLOv8OBBLoss
from ...output import LossOutput
from ._heads import box_class_maps, level_maps, pred_tensor
from ._model import ModelInfo, UltralyticsCriterion, batch_rows, hyp, levels_of
from ._swap import register_criterion

__all__ = ["OBBLoss"]


def common_kwargs(model: Any, info: ModelInfo) -> dict:
    """The YOLOv8Loss arguments every task criterion reads from the model: gains and class weights."""
    args = model.args
    kw = dict(box=hyp(args, "box"), cls=hyp(args, "cls"), dfl=hyp(args, "dfl"))
    if info.class_weights is not None:
        kw["class_weights"] = info.class_weights
    return kw


class OBBBranch(torch.nn.Module):
    """One head's ``v8OBBLoss`` on ultralytics' outputs: a :class:`YOLOv8OBBLoss` fed per level."""

    def __init__(self, loss: YOLOv8OBBLoss, info: ModelInfo) -> None:
        super().__init__()
        self.loss, self.info = loss, info

    def forward(self, preds: Mapping[str, Any], batch: Mapping[str, Any]) -> LossOutput:
        levels = levels_of(preds.get("feats"), self.info.strides)
        feats = box_class_maps(preds, levels, self.info.reg_max, self.info.num_classes)
        angles = level_maps("preds['angle']", pred_tensor(preds, "angle", 1), levels)
        return self.loss(feats, angles, batch_rows(batch, feats[0].device, box_dim=5))


@register_criterion("OBBModel")
class OBBLoss(UltralyticsCriterion):
    """``loss, items = OBBLoss(model)(preds, batch)``: ultralytics' ``v8OBBLoss`` (items
    box_loss, cls_loss, dfl_loss | l1_loss, angle_loss), end-to-end for heads with a one-to-one
    branch (see :class:`~detloss.integrations.ultralytics.UltralyticsCriterion`)."""

    def make_branch(self, model: Any, info: ModelInfo, tal_topk: int, tal_topk2: Optional[int]) -> torch.nn.Module:
        loss = YOLOv8OBBLoss(
            info.num_classes, info.strides, info.reg_max, tal_topk=tal_topk, tal_topk2=tal_topk2,
            angle=hyp(model.args, "angle"), angle_range=None if info.head_is("OBB26") else HEAD_ANGLE_RANGE,
            **common_kwargs(model, info),
        ).to(info.device)
        return OBBBranch(loss, info)
