"""Drop-in for ultralytics 8.4's segmentation criteria: :class:`SegmentationLoss`
(``v8SegmentationLoss``; ``SegmentLoss26`` for ``Segment26`` heads; ``E2ELoss(...)`` of them for
heads with a one-to-one branch), computed by :class:`detloss.losses.segment.YOLOv8SegmentLoss` /
:class:`~detloss.losses.segment.YOLO26SegmentLoss`.

It reads what those read (see :mod:`._model`): the common fields and ``model.args.overlap_mask``
(the number of mask coefficients comes from the prototypes, as in ultralytics). Both mask terms
take ultralytics' box gain. ``preds``: ``boxes``, ``scores``, ``feats``, ``mask_coefficient (B, nm,
A)``, ``proto (B, nm, h, w)`` or, from ``Segment26`` heads, the tuple ``(prototypes, semantic
logits (B, nc, hs, ws))``; ``batch``: ``batch_idx``, ``cls``, ``bboxes``, ``masks`` and, for
``Segment26``, ``sem_masks``. ultralytics' items always include ``sem_loss`` (0 for
``v8SegmentationLoss``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ...losses.segment import YOLO26SegmentLoss, YOLOv8SegmentLoss
from ...output import LossOutput
from ._heads import box_class_maps, level_maps, pred_tensor
from ._model import ModelInfo, UltralyticsCriterion, batch_rows, batch_tensor, hyp, levels_of
from ._swap import register_criterion
from .obb import common_kwargs

__all__ = ["SegmentationLoss"]


class SegmentBranch(torch.nn.Module):
    """One head's segmentation loss on ultralytics' outputs (a :class:`YOLOv8SegmentLoss` fed per
    level); for the YOLOv8 form it adds ultralytics' constant ``sem`` item (0)."""

    def __init__(self, loss: YOLOv8SegmentLoss, info: ModelInfo) -> None:
        super().__init__()
        self.loss, self.info = loss, info

    def forward(self, preds: Mapping[str, Any], batch: Mapping[str, Any]) -> LossOutput:
        levels = levels_of(preds.get("feats"), self.info.strides)
        feats = box_class_maps(preds, levels, self.info.reg_max, self.info.num_classes)
        coef = level_maps("preds['mask_coefficient']", pred_tensor(preds, "mask_coefficient"), levels)
        if "proto" not in preds:
            raise ValueError(f"preds: expected a 'proto' entry (the prototypes), got keys {sorted(preds)}")
        proto, semantic = preds["proto"], None
        if isinstance(proto, tuple):
            if len(proto) != 2:
                raise ValueError(f"preds['proto']: expected the prototypes or (prototypes, semantic logits), got a tuple of {len(proto)}")
            proto, semantic = proto
        is26 = isinstance(self.loss, YOLO26SegmentLoss)
        if is26 != (semantic is not None):
            want = "(prototypes, semantic logits) from a Segment26 head" if is26 else "the prototypes alone (a Segment head)"
            raise ValueError(f"preds['proto']: expected {want}, got {'a tuple' if semantic is not None else 'a tensor'}")
        dev = feats[0].device
        rows, masks = batch_rows(batch, dev), batch_tensor(batch, "masks").to(dev)
        if is26:
            return self.loss(feats, coef, proto, semantic, rows, masks, batch_tensor(batch, "sem_masks").to(dev))
        out = self.loss(feats, coef, proto, rows, masks)
        zero = out.total.new_zeros(())
        return LossOutput(out.total, {**out.components, "sem": zero}, out.stats, {**out.terms, "sem": zero})


@register_criterion("SegmentationModel")
class SegmentationLoss(UltralyticsCriterion):
    """``loss, items = SegmentationLoss(model)(preds, batch)``: ultralytics' ``v8SegmentationLoss``
    / ``SegmentLoss26`` (items box_loss, seg_loss, cls_loss, dfl_loss | l1_loss, sem_loss),
    end-to-end for heads with a one-to-one branch (see
    :class:`~detloss.integrations.ultralytics.UltralyticsCriterion`)."""

    def make_branch(self, model: Any, info: ModelInfo, tal_topk: int, tal_topk2: Optional[int]) -> torch.nn.Module:
        kw = common_kwargs(model, info)
        kw.update(tal_topk=tal_topk, tal_topk2=tal_topk2, num_masks=None, overlap_masks=bool(model.args.overlap_mask),
                  seg=kw["box"])
        if info.head_is("Segment26"):
            loss: YOLOv8SegmentLoss = YOLO26SegmentLoss(info.num_classes, info.strides, info.reg_max, sem=kw["box"], **kw)
        else:
            loss = YOLOv8SegmentLoss(info.num_classes, info.strides, info.reg_max, **kw)
        return SegmentBranch(loss.to(info.device), info)
