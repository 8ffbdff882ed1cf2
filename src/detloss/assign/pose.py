"""Pose task-aligned assigner (YOLO26-pose), on :mod:`detloss.assign.aligned`.

Source: ultralytics 8.4 ``utils/tal.py`` ``PoseTaskAlignedAssigner`` (``PoseLoss26``'s assigner;
YOLOv8-pose uses the plain :class:`~detloss.assign.tal.TaskAlignedAssigner`). Boxes are xyxy
pixels, keypoints pixels.

- **Candidates**: those of the detection assigner (anchor centre strictly inside the box, sides
  shorter than ``min_side`` widened), then gated by pyramid level: with ``s`` the anchor's stride
  and ``side = sqrt(w * h)`` of the box, keep ``lo * s <= side`` (or ``s`` the finest stride) and
  ``side <= hi * s`` (or ``s`` the coarsest), ``(lo, hi) = (2, 12)``; a box the gate would leave
  without candidates keeps its ungated ones.
- **Overlap**: the keypoint OKS of the prediction (:func:`detloss.functional.object_keypoint_similarity`
  with the box area times 0.53, as ultralytics' PoseValidator scales it), or, for a box without
  visible keypoints, the CIoU of the boxes (at least 0).
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import torch
from torch import Tensor

from .. import functional as fn
from ..anchors import Level
from .aligned import BoxTaskAlignedAssigner, CandidatePairs

__all__ = ["PoseTaskAlignedAssigner", "OKS_AREA_SCALE", "LEVEL_RANGE"]

#: The box area is scaled by this before it enters the OKS (ultralytics' PoseValidator).
OKS_AREA_SCALE = 0.53
#: ``(lo, hi)``: a box of side ``sqrt(w * h)`` is a candidate on levels with ``lo * s <= side <= hi * s``.
LEVEL_RANGE = (2.0, 12.0)


class PoseTaskAlignedAssigner(BoxTaskAlignedAssigner):
    """Task-aligned assignment by keypoint OKS with a pyramid-level gate (module docstring).

    Extra arguments: ``sigmas`` ``[K]`` (the OKS constants, keyword) and ``level_range``. Call
    :meth:`assign` with, besides the common inputs (``pd_bboxes`` / ``gt_bboxes`` xyxy pixels),
    ``pd_kpts [B, A, K, 2]`` and ``gt_kpts [B, M, K, 3]`` (x, y, visibility) in pixels.
    """

    def __init__(self, topk: int = 10, num_classes: int = 80, *, sigmas: Tensor,
                 level_range: Tuple[float, float] = LEVEL_RANGE, **kwargs: Any) -> None:
        super().__init__(topk, num_classes, **kwargs)
        self.sigmas = sigmas
        self.level_range = (float(level_range[0]), float(level_range[1]))

    def candidates(self, boxes: Tensor, img: Tensor, levels: Sequence[Level], **extra: Any) -> Tuple[Tensor, Tensor]:
        box, anchor = super().candidates(boxes, img, levels)
        pairs = CandidatePairs(box, anchor, img[box], img[box], boxes, levels)
        s = pairs.level_strides(boxes.dtype)
        wh = boxes[:, 2:] - boxes[:, :2]
        side = (wh[:, 0] * wh[:, 1]).clamp(min=0).sqrt()[box]
        lo, hi = self.level_range
        s_min, s_max = min(st for _, _, st in levels), max(st for _, _, st in levels)
        gated = ((side >= lo * s) | (s == s_min)) & ((side <= hi * s) | (s == s_max))
        has_gated = torch.zeros(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        has_gated[box[gated]] = True
        keep = gated | ~has_gated[box]
        return box[keep], anchor[keep]

    def overlaps(self, pairs: CandidatePairs, *, pd_bboxes: Tensor, pd_kpts: Tensor, gt_kpts: Tensor, **extra: Any) -> Tensor:
        gt_box = pairs.boxes[pairs.box]
        iou = super().overlaps(pairs, pd_bboxes=pd_bboxes)
        gk = gt_kpts[pairs.img, pairs.row]  # [C, K, 3]
        vis = gk[..., 2] > 0
        wh = gt_box[:, 2:] - gt_box[:, :2]
        area = wh[:, 0] * wh[:, 1] * OKS_AREA_SCALE
        oks = fn.object_keypoint_similarity(
            pd_kpts[pairs.img, pairs.anchor], gk[..., :2], visible=vis, area=area.clamp(min=0),
            sigmas=self.sigmas.to(gk.device), eps=self.eps,
        )
        return torch.where(vis.any(-1), oks.to(iou.dtype), iou)
