r"""The oriented-box (OBB) loss of YOLOv8-OBB / YOLO11-OBB / YOLO26-OBB (ultralytics ``v8OBBLoss``).

Source: ultralytics 8.4 ``ultralytics/utils/loss.py`` (``v8OBBLoss``, ``RotatedBboxLoss``,
``DFLoss``), ``utils/tal.py`` (``RotatedTaskAlignedAssigner``, ``dist2rbox``, ``rbox2dist``) and
``utils/metrics.py`` (``probiou``); ProbIoU: Llerena et al. 2021 (arXiv:2106.06072).

Boxes are ``xywhr`` (centre, sides, rotation in radians). The head predicts, per anchor, the
distances ``(l, t, r, b)`` to the box sides along the box's own axes (DFL distributions, or the
distances themselves when ``reg_max = 1``), the class logits and the angle ``theta``; the box is
centred at ``anchor + R(theta) ((r - l) / 2, (b - t) / 2)`` with sides ``l + r`` and ``t + b``
(grid units). Targets narrower or lower than 2 pixels are dropped first. With the rotated
task-aligned assignment (:class:`~detloss.assign.rotated.RotatedTaskAlignedAssigner`), ``S`` the
sum of the target scores (at least 1) and ``w_a`` the target score of positive ``a``::

    cls   = sum_{a, c} BCEWithLogits(logit_{a,c}, target_score_{a,c}) / S
    box   = sum_{a in pos} w_a * (1 - ProbIoU(pred_a, target_a; variance floor 0.01)) / S
    dfl   = sum_{a in pos} w_a * mean_sides DFL(dist logits, clamp(rbox2dist(target), 0, reg_max - 1.01)) / S
      (reg_max 1: "l1" = sum w_a mean_sides |d - t| * stride / (W, H, W, H) / S, under the dfl gain)
    angle = sum_{a in pos} w_a * exp(-log(w_t / h_t)^2 / 9) * sin^2(2 (theta_a - theta_t wrapped to pi)) / S
    total = (box_gain * box + cls_gain * cls + dfl_gain * dfl + angle_gain * angle) * batch_size
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import functional as F
from .._checks import check_floating, compute_dtype
from ..anchors import make_anchors
from ..assign.base import Assignment
from ..assign.rotated import RotatedTaskAlignedAssigner
from ..boxes import check_yolo_targets, image_slots
from ._rows import gather_rows
from .tasks import aligned_assignment, box_assigner, expected_distances, flatten_level_maps
from .base import Decoded
from .yolov8 import DFL_MARGIN, YOLOv8Decoding, YOLOv8Inputs, YOLOv8Loss

__all__ = ["YOLOv8OBBLoss", "OBBInputs", "MIN_TARGET_SIDE", "HEAD_ANGLE_RANGE"]

#: Targets whose width or height is below this many pixels are dropped (ultralytics ``v8OBBLoss``).
MIN_TARGET_SIDE = 2.0
#: The angles YOLOv8 / YOLO11 OBB heads emit: ``(sigmoid(x) - 0.25) * pi`` lies in this range.
HEAD_ANGLE_RANGE = (-math.pi / 4, 3 * math.pi / 4)


@dataclass
class OBBInputs(YOLOv8Inputs):
    """:class:`~detloss.losses.yolov8.YOLOv8Inputs` with ``gt_bboxes [B, M, 5]`` ``xywhr`` pixels
    and the predicted angles ``pred_angle [B, A, 1]``."""

    pred_angle: Optional[Tensor] = None


def check_obb_targets(targets: object, num_classes: int, batch_size: int) -> Tensor:
    """Rows ``[N, 7]`` ``(image, class, cx, cy, w, h, angle)``: normalized box, angle in radians
    with ``|angle| <= pi`` (degrees usually exceed it)."""
    t = check_floating("targets", targets)
    if t.ndim != 2 or t.shape[1] != 7:
        raise ValueError(f"targets: expected shape [N, 7] (image, class, cx, cy, w, h, angle), got {tuple(t.shape)}")
    check_yolo_targets(t[:, :6], num_classes=num_classes, batch_size=batch_size)
    ang = t[:, 6]
    bad = ~torch.isfinite(ang) | (ang.abs() > math.pi)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(f"targets: expected an angle in radians in [-pi, pi] in column 6, got {float(ang[r])} in row {r}")
    return t


class YOLOv8OBBLoss(YOLOv8Loss):
    """Oriented-box loss equal to ultralytics 8.4 ``v8OBBLoss`` (formula and source in the module
    docstring); built on :class:`~detloss.losses.yolov8.YOLOv8Loss`, whose arguments it takes,
    plus (keyword-only, ultralytics' defaults):

        angle: gain of the angle term (1.0).
        min_target_side: targets with a side below this many pixels are dropped (2).
        angle_range: the range of the head's angles, checked (``HEAD_ANGLE_RANGE``, the
            ``(sigmoid - 0.25) * pi`` of YOLOv8 / YOLO11 OBB heads); None for heads emitting a raw
            angle (YOLO26-OBB, ``reg_max=1``).
        zero_ties: the reference's zero-alignment ties (see :mod:`detloss.assign.aligned`; the
            OBB terms do not depend on them, only ``num_pos`` does).

    Call ``loss_fn(feats, angles, targets)``: ``feats`` as for YOLOv8Loss (per level ``[B, 4 *
    reg_max + nc, H, W]``), ``angles`` per level ``[B, 1, H, W]`` in radians, ``targets`` rows
    ``[N, 7]`` ``(image, class, cx, cy, w, h, angle)`` (normalized box, angle in radians; the
    ``xywhr`` of ultralytics' OBB labels). Returns a :class:`~detloss.LossOutput` with components
    "box", "cls", "dfl" (or "l1"), "angle" (after the gains; ``terms`` times the batch size) and
    the stats of YOLOv8Loss (``iou_mean``: the mean ProbIoU of the positives, ``ciou_mean``
    omitted) plus ``dropped_targets`` (rows under ``min_target_side``). ``target_index`` of
    :meth:`assign` is the row of ``targets``; :meth:`decode` gives ``xywhr`` pixel boxes.
    """

    name = "yolov8-obb"

    def __init__(
        self,
        num_classes: int,
        strides: Sequence[float] = (8, 16, 32),
        reg_max: int = 16,
        box: float = 7.5,
        cls: float = 0.5,
        dfl: float = 1.5,
        tal_topk: int = 10,
        *,
        angle: float = 1.0,
        min_target_side: float = MIN_TARGET_SIDE,
        angle_range: Optional[Tuple[float, float]] = HEAD_ANGLE_RANGE,
        zero_ties: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, strides, reg_max, box, cls, dfl, tal_topk, **kwargs)
        self.add_term("angle", "angle_term", angle)
        if not min_target_side >= 0:
            raise ValueError(f"min_target_side: expected a number >= 0, got {min_target_side!r}")
        self.min_target_side = float(min_target_side)
        self.angle_range = None if angle_range is None else (float(angle_range[0]), float(angle_range[1]))
        self.assigner = box_assigner(self.assigner, num_classes, self.strides, zero_ties, RotatedTaskAlignedAssigner)

    # ------------------------------------------------------------------ checks
    def _check_angles(self, angles: Sequence[Tensor], inputs_like: Tensor, levels, dtype) -> Tensor:
        flat = flatten_level_maps("angles", angles, levels, 1, inputs_like, dtype, " (one angle channel)")
        self.check_angle_range(flat, angles[0].dtype)
        return flat

    def check_angle_range(self, angles: Tensor, input_dtype: torch.dtype, name: str = "angles") -> None:
        """A ValueError naming ``name`` when an angle lies outside ``angle_range`` by more than the
        head's own rounding in ``input_dtype`` (nothing to check when ``angle_range`` is None)."""
        if self.angle_range is None or not angles.numel():
            return
        lo, hi = self.angle_range
        slack = 4 * torch.finfo(input_dtype).eps * max(abs(lo), abs(hi))  # the head's own rounding
        lo, hi = lo - slack, hi + slack
        amin, amax = torch.aminmax(angles.detach())
        if bool((amin < lo) | (amax > hi)):
            bad = float(amin) if float(amin) < lo else float(amax)
            raise ValueError(
                f"{name}: expected the head's angles in [{lo:.6g}, {hi:.6g}] (angle_range), got {bad:.6g}; "
                "pass angle_range=None for a head emitting raw angles (YOLO26)"
            )

    def check(self, feats: Sequence[Tensor], angles: Sequence[Tensor], targets: Tensor) -> OBBInputs:
        levels = self._check_feats(feats)
        dt = compute_dtype(*feats)
        pred_dist, pred_logits = self._split(feats, dt)
        return self.obb_inputs(levels, pred_dist, pred_logits, self._check_angles(angles, feats[0], levels, dt), targets)

    def obb_inputs(self, levels, pred_dist: Tensor, pred_logits: Tensor, pred_angle: Tensor, targets: Tensor) -> OBBInputs:
        """The checked inputs from the head's outputs over all anchors (``pred_dist [B, A, 4 *
        reg_max]``, ``pred_logits [B, A, nc]``, ``pred_angle [B, A, 1]``, in the compute dtype) and
        the target rows: targets below ``min_target_side`` dropped, the rest padded per image."""
        bsz, dt, dev = pred_dist.shape[0], pred_dist.dtype, pred_dist.device
        targets = check_obb_targets(targets, self.num_classes, bsz)
        h, w = levels[0][0] * self.strides[0], levels[0][1] * self.strides[0]
        rows = targets.to(dev)
        keep = (rows[:, 4] * w >= self.min_target_side) & (rows[:, 5] * h >= self.min_target_side)
        kept = keep.nonzero().squeeze(1)
        rows = rows[kept]
        img = rows[:, 0].long()
        slot, m = image_slots(img, bsz)
        xywhr = torch.cat((rows[:, 2:6].to(dt) * torch.tensor([w, h, w, h], dtype=dt, device=dev), rows[:, 6:7].to(dt)), 1)
        gt_labels = torch.zeros((bsz, m), dtype=torch.long, device=dev)
        gt_bboxes = torch.zeros((bsz, m, 5), dtype=dt, device=dev)
        gt_rows = torch.full((bsz, m), -1, dtype=torch.long, device=dev)
        gt_labels[img, slot] = rows[:, 1].long()
        gt_bboxes[img, slot] = xywhr
        gt_rows[img, slot] = kept
        return OBBInputs(list(levels), bsz, dt, dev, (h, w), pred_dist, pred_logits, targets, gt_labels, gt_bboxes,
                         gt_bboxes.sum(-1) > 0, gt_rows, pred_angle=pred_angle)

    # ------------------------------------------------------------------ the steps
    def decode_rboxes(self, pred_dist: Tensor, pred_angle: Tensor, anchor_points: Tensor) -> Tensor:
        """Predicted ``xywhr`` boxes (grid units) from the box channels and the angles."""
        dist = expected_distances(pred_dist, self.reg_max)
        return torch.cat((F.dist_to_rbox(dist, pred_angle, anchor_points=anchor_points), pred_angle), -1)

    def prepare(self, inputs: OBBInputs) -> YOLOv8Decoding:
        """Anchor points and every anchor's decoded box without gradient (the assigner's input;
        :meth:`gather` decodes the positives' boxes again with gradient, so backward never runs
        over all anchors)."""
        anchor_points, stride_tensor = make_anchors(inputs.levels, inputs.dtype, inputs.device)
        with torch.no_grad():
            boxes = self.decode_rboxes(inputs.pred_dist, inputs.pred_angle, anchor_points)
        return YOLOv8Decoding(anchor_points, stride_tensor, boxes)

    def assignment(self, inputs: OBBInputs, prepared: YOLOv8Decoding) -> Assignment:
        boxes = prepared.pred_bboxes.detach()
        return aligned_assignment(self, inputs, torch.cat((boxes[..., :4] * prepared.stride_tensor, boxes[..., 4:]), -1))

    def gather(self, inputs: OBBInputs, prepared: YOLOv8Decoding, assignment: Assignment) -> YOLOv8Decoding:
        out = super().gather(inputs, prepared, assignment)
        boxes = assignment.boxes
        pos_angle = gather_rows(inputs.pred_angle, assignment.batch_index, assignment.pred_index)
        return replace(out, pos_pred_bboxes=self.decode_rboxes(out.pos_pred_dist, pos_angle, out.pos_anchor_points),
                       pos_target_bboxes=torch.cat((boxes[:, :4] / out.pos_strides, boxes[:, 4:]), 1))

    def _target_distances(self, prepared: YOLOv8Decoding) -> Tensor:
        return F.rbox_to_dist(prepared.pos_target_bboxes, anchor_points=prepared.pos_anchor_points)

    # ------------------------------------------------------------------ the terms
    def box_term(self, inputs: OBBInputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """``sum w_a (1 - ProbIoU)`` (variance floor 0.01) over the positives, over S."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        loss = F.probiou_loss(prepared.pos_pred_bboxes, prepared.pos_target_bboxes, weight=assignment.weights,
                              reduction="sum", validate=False)
        return loss / prepared.normalizer

    def dfl_term(self, inputs: OBBInputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """DFL toward the target's distances along its own axes (clamped to ``reg_max - 1.01``), over S."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        reg_max = self.reg_max
        ltrb = self._target_distances(prepared).clamp(0, reg_max - 1 - DFL_MARGIN)
        dfl = F.distribution_focal_loss(prepared.pos_pred_dist.reshape(-1, reg_max), ltrb.reshape(-1), reduction="none")
        return (dfl.view(-1, 4).mean(-1) * assignment.weights).sum() / prepared.normalizer

    def l1_term(self, inputs: OBBInputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """``reg_max`` 1: L1 of the image-normalized distances along the target's axes, over S."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        h, w = inputs.image_hw
        scale = prepared.pos_strides / prepared.pos_pred_dist.new_tensor([w, h, w, h])
        l1 = F.l1_loss(prepared.pos_pred_dist * scale, self._target_distances(prepared) * scale, reduction="none")
        return (l1.mean(-1) * assignment.weights).sum() / prepared.normalizer

    def angle_term(self, inputs: OBBInputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """The aspect-damped ``sin^2(2 delta)`` angle loss, weighted by the target scores, over S."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        pred, target = prepared.pos_pred_bboxes, prepared.pos_target_bboxes
        loss = F.rotated_angle_loss(pred[:, 4], target[:, 4], target_wh=target[:, 2:4], weight=assignment.weights,
                                    reduction="sum")
        return loss / prepared.normalizer

    def stats(self, inputs: OBBInputs, prepared: YOLOv8Decoding, assignment: Assignment, raw: Dict[str, Tensor]) -> Dict[str, Any]:
        n_rows = inputs.targets.shape[0]
        matched = torch.zeros(max(n_rows, 1), dtype=torch.bool, device=inputs.device)
        matched[assignment.target_index] = True
        iou_mean: Any = 0.0
        if assignment.num_pos:
            iou_mean = F.probiou(prepared.pos_pred_bboxes.detach(), prepared.pos_target_bboxes, validate=False).mean()
        return {
            "num_pos": assignment.num_pos,
            "num_targets": inputs.mask_gt.sum(),
            "matched_targets": matched.sum(),
            "dropped_targets": n_rows - int(inputs.gt_rows.ge(0).sum()),
            "normalizer": prepared.normalizer,
            "target_scores_sum": prepared.normalizer,
            "iou_mean": iou_mean,
        }

    # ------------------------------------------------------------------ inference
    def decode(self, feats: Sequence[Tensor], angles: Sequence[Tensor]) -> Decoded:
        """Inference decoding: ``boxes [B, A, 5]`` ``xywhr`` (pixels, radians) and class scores
        ``sigmoid(logits)`` ``[B, A, nc]``, in float32 or wider."""
        levels = self._check_feats(feats)
        dt = compute_dtype(*feats)
        pred_dist, pred_logits = self._split(feats, dt)
        pred_angle = self._check_angles(angles, feats[0], levels, dt)
        anchor_points, stride_tensor = make_anchors(levels, dt, feats[0].device)
        boxes = self.decode_rboxes(pred_dist, pred_angle, anchor_points)
        return Decoded(torch.cat((boxes[..., :4] * stride_tensor, boxes[..., 4:]), -1), pred_logits.sigmoid())
