"""Rotated task-aligned assigner (YOLOv8-OBB / YOLO26-OBB), on :mod:`detloss.assign.aligned`.

Source: ultralytics 8.4 ``utils/tal.py`` ``RotatedTaskAlignedAssigner`` (with ``v8OBBLoss``'s
settings: topk 10, alpha 0.5, beta 6.0, eps 1e-9). Boxes are ``xywhr`` in pixels.

- **Candidates**: anchor centres inside the rotated box, boundary included: with the corners
  ``a, b, d`` (:func:`detloss.functional.xywhr_to_corners`: ``a = c + u + v``, ``b = c + u - v``,
  ``d = c - u + v``) and ``p`` the anchor, ``0 <= (p - a).(b - a) <= |b - a|^2`` and
  ``0 <= (p - a).(d - a) <= |d - a|^2``; sides shorter than ``min_side`` (the second stride)
  are first widened to it.
- **Overlap**: ProbIoU of the target and the predicted rotated box (no variance floor), at least 0.
"""
from __future__ import annotations

from typing import Any, Sequence, Tuple

import torch
from torch import Tensor

from .. import functional as fn
from ..anchors import Level
from .aligned import AlignedAssigner, CandidatePairs
from .tal import _candidate_pairs, anchor_grid

__all__ = ["RotatedTaskAlignedAssigner", "points_in_rboxes"]


def points_in_rboxes(points: Tensor, boxes: Tensor) -> Tensor:
    """bool ``[...]``: the point ``points[..., :2]`` lies in the ``xywhr`` box ``boxes[..., :5]``
    (boundary included; the rule of the module docstring, with the reference's arithmetic)."""
    corners = fn.xywhr_to_corners(boxes)
    a, b, d = corners[..., 0, :], corners[..., 1, :], corners[..., 3, :]
    ab, ad = b - a, d - a
    apx, apy = points[..., 0] - a[..., 0], points[..., 1] - a[..., 1]
    dot_ab = apx * ab[..., 0] + apy * ab[..., 1]
    dot_ad = apx * ad[..., 0] + apy * ad[..., 1]
    norm_ab = (ab * ab).sum(-1)
    norm_ad = (ad * ad).sum(-1)
    return (dot_ab >= 0) & (dot_ab <= norm_ab) & (dot_ad >= 0) & (dot_ad <= norm_ad)


class RotatedTaskAlignedAssigner(AlignedAssigner):
    """Task-aligned assignment of rotated boxes (see the module docstring; arguments and call as
    :class:`~detloss.assign.aligned.AlignedAssigner`, with ``pd_bboxes [B, A, 5]`` and
    ``gt_bboxes [B, M, 5]`` ``xywhr`` in pixels)."""

    box_dim = 5

    def widened(self, boxes: Tensor) -> Tensor:
        """``boxes`` with sides shorter than ``min_side`` set to it (for the candidate test)."""
        if self.min_side is None:
            return boxes
        side = torch.tensor(self.min_side, dtype=boxes.dtype, device=boxes.device)
        wh = boxes[:, 2:4]
        return torch.cat((boxes[:, :2], torch.where(wh < side, side, wh), boxes[:, 4:]), 1)

    def candidates(self, boxes: Tensor, img: Tensor, levels: Sequence[Level], **extra: Any) -> Tuple[Tensor, Tensor]:
        wide = self.widened(boxes)
        corners = fn.xywhr_to_corners(wide)
        # anchors strictly inside the corners' bounding box widened by one pixel, then the exact test
        hull = torch.cat((corners.amin(1) - 1.0, corners.amax(1) + 1.0), 1)
        box, anchor = _candidate_pairs(hull, levels, self.eps)
        points = anchor_grid(levels, boxes.dtype, boxes.device)[anchor]
        keep = points_in_rboxes(points, wide[box])
        return box[keep], anchor[keep]

    def overlaps(self, pairs: CandidatePairs, *, pd_bboxes: Tensor, **extra: Any) -> Tensor:
        gt = pairs.boxes[pairs.box]
        pd = pd_bboxes[pairs.img, pairs.anchor]
        return fn.probiou(gt, pd, validate=False).clamp(min=0)
