"""The YOLOv8 / YOLO11 detection loss (ultralytics ``v8DetectionLoss``), exact and lean.

Source: ultralytics 8.4 ``ultralytics/utils/loss.py`` (``v8DetectionLoss``, ``BboxLoss``,
``DFLoss``) and ``ultralytics/utils/tal.py`` (``make_anchors``, ``dist2bbox``, ``bbox2dist``);
the assignment is :class:`detloss.assign.tal.TaskAlignedAssigner`.

With ``A`` anchor points (cell centres of all levels), ``S`` = the sum of all target scores in
the batch (at least 1), ``w_a`` = the target score of positive anchor ``a`` (summed over
classes), boxes in grid units (pixels / the anchor's stride)::

    pred box  = anchor -/+ sum_j j * softmax(dist logits)_j       (left, top / right, bottom)
    cls = sum_{a, c} BCEWithLogits(logit_{a,c}, target_score_{a,c}) / S
    box = sum_{a in pos} w_a * (1 - CIoU(pred_a, target_a)) / S     (CIoU of ultralytics' bbox_iou)
    dfl = sum_{a in pos} w_a * mean_sides DFL(dist logits, clamp(target distance, 0, reg_max - 1.01)) / S
    total = (box_gain * box + cls_gain * cls + dfl_gain * dfl) * batch_size

``reg_max = 1`` (YOLO26's DFL-free head, ultralytics 8.4 ``BboxLoss`` without ``dfl_loss``): the
four box channels are the ltrb distances themselves (``pred box = anchor -/+ d``, not clamped), and
an L1 term on image-normalized distances replaces DFL, weighted by the same ``dfl`` gain (item
"l1"); ``s_a`` is the anchor's stride, ``W, H`` the image size, ``t`` the target's distances::

    l1 = sum_{a in pos} w_a * mean_{k in l,t,r,b} |d_k - t_k| * s_a / (W for l, r; H for t, b) / S

``class_weights`` ``c`` (``[nc]``, ultralytics' ``model.class_weights``) multiply the per-class
BCE: ``cls = sum_{a, c} c_c * BCEWithLogits(...) / S``.

The steps (:class:`~detloss.losses.base.DetectionLoss`): :meth:`YOLOv8Loss.check` splits the
head outputs into the box distributions and the class logits and pads the targets per image;
:meth:`~YOLOv8Loss.prepare` decodes the boxes (:meth:`~YOLOv8Loss.decode_boxes`);
:meth:`~YOLOv8Loss.assignment` runs the assigner; :meth:`~YOLOv8Loss.gather` takes the
positives' rows and the normalizer ``S``; one method per term (``box_term``, ``cls_term``,
``dfl_term``). A variant changes one step by overriding it: the box decoding and the third term
for a head without distributions (``reg_max=1``), the class term for class weights, the
assigner (``self.assigner`` or :meth:`~YOLOv8Loss.assignment`) for rotated boxes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import functional as F
from .._checks import check_floating, check_tensor, compute_dtype, upcast
from ..anchors import GridLevel, Level, make_anchors
from ..assign.base import Assignment
from ..assign.tal import TaskAlignedAssigner
from ..boxes import check_yolo_targets, cxcywh_to_xyxy, image_slots
from .base import Decoded, DetectionLoss

__all__ = ["YOLOv8Loss", "YOLOv8Inputs", "YOLOv8Decoding", "make_anchors", "decode_distances", "preprocess_targets"]

#: DFL targets are clamped to ``reg_max - 1 - DFL_MARGIN`` (ultralytics ``bbox2dist`` / ``DFLoss``).
DFL_MARGIN = 0.01


def decode_distances(pred_dist: Tensor, anchor_points: Tensor) -> Tensor:
    """Expected ltrb distances of the box-side distributions ``[..., A, 4 * reg_max]`` (side
    major) and the xyxy boxes they give around ``anchor_points`` (ultralytics ``bbox_decode`` +
    ``dist2bbox``); units of the anchor points."""
    reg_max = pred_dist.shape[-1] // 4
    proj = torch.arange(reg_max, dtype=pred_dist.dtype, device=pred_dist.device)
    dist = pred_dist.view(*pred_dist.shape[:-1], 4, reg_max).softmax(-1).matmul(proj)
    lt, rb = dist.chunk(2, -1)
    return torch.cat((anchor_points - lt, anchor_points + rb), -1)


def _padded_targets(
    targets: Tensor, batch_size: int, image_hw: Tuple[float, float], dtype: torch.dtype
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`preprocess_targets` plus ``rows [B, M]``: the row of ``targets`` in each slot (-1
    in padding slots)."""
    dev = targets.device
    img = targets[:, 0].long()
    slot, m = image_slots(img, batch_size)
    h, w = image_hw
    xyxy = cxcywh_to_xyxy(targets[:, 2:6].to(dtype) * torch.tensor([w, h, w, h], dtype=dtype, device=dev))
    labels = torch.zeros((batch_size, m), dtype=torch.long, device=dev)
    boxes = torch.zeros((batch_size, m, 4), dtype=dtype, device=dev)
    rows = torch.full((batch_size, m), -1, dtype=torch.long, device=dev)
    labels[img, slot] = targets[:, 1].long()
    boxes[img, slot] = xyxy
    rows[img, slot] = torch.arange(img.numel(), device=dev)
    return labels, boxes, boxes.sum(-1) > 0, rows


def preprocess_targets(
    targets: Tensor, batch_size: int, image_hw: Tuple[float, float], dtype: torch.dtype
) -> Tuple[Tensor, Tensor, Tensor]:
    """YOLO rows -> per-image padded ``gt_labels [B, M]`` (int64), ``gt_bboxes [B, M, 4]`` (xyxy
    pixels) and ``mask_gt [B, M]``; ``M`` = most targets in one image. Rows keep their order
    within an image (the order ``target_gt_idx`` refers to); they need not be sorted by image.
    A row is valid when ``x1 + y1 + x2 + y2 > 0`` (ultralytics' rule for padding)."""
    return _padded_targets(targets, batch_size, image_hw, dtype)[:3]


def _check_class_weights(weights: Optional[Tensor], num_classes: int) -> Optional[Tensor]:
    if weights is None:
        return None
    w = check_floating("class_weights", weights)
    if w.shape != (num_classes,):
        raise ValueError(f"class_weights: expected shape [{num_classes}] (num_classes), got {tuple(w.shape)}")
    if not bool((torch.isfinite(w) & (w >= 0)).all()):
        raise ValueError(f"class_weights: expected finite non-negative weights, got {w.tolist()}")
    return w.detach().clone()


@dataclass
class YOLOv8Inputs:
    """Checked inputs of :class:`YOLOv8Loss` (what :meth:`YOLOv8Loss.check` returns).

    ``pred_dist [B, A, 4 * reg_max]`` and ``pred_logits [B, A, nc]`` (a strided view) in the
    compute ``dtype``; the targets padded per image: ``gt_labels``, ``gt_bboxes`` (xyxy pixels),
    ``mask_gt`` (valid slots) and ``gt_rows`` (the row of ``targets`` in each slot, -1 padding),
    each ``[B, M, ...]``.
    """

    levels: List[Level]
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    image_hw: Tuple[float, float]
    pred_dist: Tensor
    pred_logits: Tensor
    targets: Tensor
    gt_labels: Tensor
    gt_bboxes: Tensor
    mask_gt: Tensor
    gt_rows: Tensor


@dataclass
class YOLOv8Decoding:
    """Training-time decoding (:meth:`YOLOv8Loss.prepare`), then what :meth:`YOLOv8Loss.gather`
    adds: anchor points ``[A, 2]`` and strides ``[A, 1]``, predicted boxes ``[B, A, 4]`` (xyxy,
    grid units); per positive (the assignment's order) its anchor point, stride, predicted box,
    distribution logits ``[P, 4 * reg_max]`` and target box (grid units); the normalizer ``S``
    and the batch size ``total`` is multiplied by (the global one with ``reduce_across_ranks``)."""

    anchor_points: Tensor
    stride_tensor: Tensor
    pred_bboxes: Tensor
    pos_anchor_points: Optional[Tensor] = None
    pos_strides: Optional[Tensor] = None
    pos_pred_bboxes: Optional[Tensor] = None
    pos_pred_dist: Optional[Tensor] = None
    pos_target_bboxes: Optional[Tensor] = None
    normalizer: Optional[Tensor] = None
    batch_factor: Union[int, Tensor] = 1


class YOLOv8Loss(DetectionLoss):
    """YOLOv8 / YOLO11 detection loss, equal to ultralytics 8.4 ``v8DetectionLoss``.

    Formula and source in the module docstring. Args (defaults = ultralytics' hyperparameters):

        num_classes: ``nc``; each level's head output has ``4 * reg_max + nc`` channels.
        strides: stride of each level in pixels; the image size is level 0's ``H, W`` times
            ``strides[0]``.
        reg_max: bins of each box-side distribution (16); 1: the head predicts the distances
            themselves and the third term is "l1" instead of "dfl" (YOLO26).
        box, cls, dfl: gains of the three terms (7.5, 0.5, 1.5).
        tal_topk: anchors kept per box by the assigner (10).
        tal_topk2: optional second cut after resolving shared anchors (None; YOLO26 one-to-one: 1).
        tal_alpha, tal_beta: exponents of the alignment metric (0.5, 6.0).
        enlarge_small_boxes: widen box sides shorter than ``strides[1]`` to it for the assigner's
            inside test (ultralytics 8.4, default); False gives ultralytics 8.3's assignment.
        dense_assigner: run the assigner the reference's dense ``[B, M, A]`` way (same results,
            more memory; a baseline for tests and benchmarks).
        class_weights: optional ``[nc]`` non-negative weights of the classes' BCE (None).
        reduce_across_ranks: off (default, as ultralytics): each rank divides by its own ``S``
            and multiplies by its own batch size, so under DistributedDataParallel the averaged
            gradient weighs ranks by the inverse of their own sums. On: every rank divides by
            ``max(sum of S over ranks / world_size, 1)`` and multiplies by the global batch size
            (the sum over ranks), so DDP's average of the gradients equals the gradient of the
            whole global batch computed on one process, and the mean of the ranks' ``total`` is
            its loss (the ``max(., 1)`` floor then applies to the mean). One all-reduce per call;
            a no-op without ``torch.distributed`` initialized.

    Call ``loss_fn(feats, targets)``: ``feats`` a list of per-level head outputs
    ``[B, 4 * reg_max + nc, H_l, W_l]`` (stride ``strides[0]`` first; channel ``k * reg_max + j``
    is bin ``j`` of side ``k`` in the order left, top, right, bottom; then the class logits),
    ``targets`` rows ``[N, 6]`` ``(image_index, class, cx, cy, w, h)`` normalized to 0..1.
    Returns a :class:`~detloss.LossOutput`: ``total`` = the sum of what v8DetectionLoss returns
    first (``(box + cls + dfl) * B`` after the gains); ``components`` "box", "cls", "dfl" ("l1" for reg_max 1) = its
    detached items (after the gains, before ``* B``); ``terms`` the same times ``B``, with their
    graph (they sum to ``total``); ``stats``: ``num_pos`` (positive anchors), ``num_targets``
    (valid boxes), ``matched_targets`` (boxes with at least one positive), ``normalizer`` and
    ``target_scores_sum`` (both the normalizer S), ``iou_mean`` (mean IoU of the positives'
    decoded boxes with their targets; 0.0 without positives), ``ciou_mean``.
    :meth:`assign` gives the :class:`~detloss.assign.tal.TALAssignment` used (``target_index``:
    the row of ``targets``); :meth:`decode` the inference boxes and scores.

    Differences: float16/bfloat16 inputs are computed in float32 (gradients come back in the
    input dtype). The reference allocates its targets in torch's default dtype, so with float64
    inputs and a float32 default it rounds to float32; here float64 inputs are computed in
    float64. Zero-alignment anchors never become positives (see
    :mod:`detloss.assign.tal`); the loss is the same.
    """

    name = "yolov8"
    term_methods = {"box": "box_term", "cls": "cls_term", "dfl": "dfl_term"}
    #: The smallest ``reg_max`` the box decoding handles (1: distances without distributions).
    min_reg_max = 1

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
        tal_topk2: Optional[int] = None,
        tal_alpha: float = 0.5,
        tal_beta: float = 6.0,
        enlarge_small_boxes: bool = True,
        dense_assigner: bool = False,
        class_weights: Optional[Tensor] = None,
        reduce_across_ranks: bool = False,
    ) -> None:
        if not isinstance(reg_max, int) or isinstance(reg_max, bool) or reg_max < self.min_reg_max:
            raise ValueError(
                f"reg_max: expected an int >= {self.min_reg_max} (1: ltrb distances, >= 2: DFL bins), got {reg_max!r}"
            )
        if reg_max == 1:  # the L1 term replaces DFL, under the dfl gain
            self.term_methods = {"box": "box_term", "cls": "cls_term", "l1": "l1_term"}
        third = "l1" if reg_max == 1 else "dfl"
        super().__init__({"box": box, "cls": cls, third: dfl}, reduce_across_ranks=reduce_across_ranks)
        self.register_buffer("class_weights", _check_class_weights(class_weights, num_classes), persistent=False)
        strides = tuple(float(s) for s in strides)
        if not strides:
            raise ValueError("strides: expected at least one level, got ()")
        self.num_classes = num_classes
        self.strides = strides
        self.reg_max = reg_max
        min_side = (strides[1] if len(strides) > 1 else strides[0]) if enlarge_small_boxes else None
        self.assigner = TaskAlignedAssigner(
            topk=tal_topk,
            num_classes=num_classes,
            alpha=tal_alpha,
            beta=tal_beta,
            topk2=tal_topk2,
            strides=strides,
            min_side=min_side,
            dense=dense_assigner,
        )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, strides={self.strides}, reg_max={self.reg_max}, "
            f"gains={self.gains}, assigner={self.assigner!r}, reduce_across_ranks={self.reduce_across_ranks}"
        )

    # ------------------------------------------------------------------ checks
    def _check_feats(self, feats: Sequence[Tensor]) -> List[Level]:
        if isinstance(feats, Tensor) or not isinstance(feats, (list, tuple)):
            raise TypeError(f"feats: expected a list of {len(self.strides)} tensors (one per level), got {type(feats).__name__}")
        if len(feats) != len(self.strides):
            raise ValueError(f"feats: expected {len(self.strides)} levels (one per stride {self.strides}), got {len(feats)}")
        no = 4 * self.reg_max + self.num_classes
        first = check_tensor("feats[0]", feats[0])
        levels = []
        for i, (f, s) in enumerate(zip(feats, self.strides)):
            check_floating(f"feats[{i}]", f)
            if f.ndim != 4 or f.shape[1] != no or f.shape[0] != first.shape[0]:
                raise ValueError(
                    f"feats[{i}]: expected shape [{first.shape[0]}, {no} (= 4 * reg_max {self.reg_max} + nc "
                    f"{self.num_classes}), H, W], got {tuple(f.shape)}"
                )
            if f.dtype != first.dtype or f.device != first.device:
                raise TypeError(f"feats[{i}]: expected dtype {first.dtype} on {first.device} like feats[0], got {f.dtype} on {f.device}")
            bad = ~torch.isfinite(f.detach())
            if bool(bad.any()):
                raise ValueError(f"feats[{i}]: expected finite values, got NaN or inf at {tuple(int(j) for j in bad.nonzero()[0])}")
            levels.append((int(f.shape[2]), int(f.shape[3]), s))
        return levels

    def _split(self, feats: Sequence[Tensor], dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``pred_dist [B, A, 4 * reg_max]`` (contiguous) and ``pred_logits [B, A, nc]`` (a view:
        no copy of the class logits) in ``dtype``."""
        bsz = feats[0].shape[0]
        pred = torch.cat([upcast(f, dtype).reshape(bsz, f.shape[1], -1) for f in feats], 2)
        pred_dist, pred_logits = pred.split((4 * self.reg_max, self.num_classes), 1)
        return pred_dist.permute(0, 2, 1).contiguous(), pred_logits.permute(0, 2, 1)

    def check(self, feats: Sequence[Tensor], targets: Tensor) -> YOLOv8Inputs:
        levels = self._check_feats(feats)
        bsz = feats[0].shape[0]
        targets = check_yolo_targets(targets, num_classes=self.num_classes, batch_size=bsz)
        dt = compute_dtype(*feats)
        dev = feats[0].device
        pred_dist, pred_logits = self._split(feats, dt)
        image_hw = (levels[0][0] * self.strides[0], levels[0][1] * self.strides[0])
        gt_labels, gt_bboxes, mask_gt, gt_rows = _padded_targets(targets.to(dev), bsz, image_hw, dt)
        return YOLOv8Inputs(levels, bsz, dt, dev, image_hw, pred_dist, pred_logits, targets,
                            gt_labels, gt_bboxes, mask_gt, gt_rows)

    # ------------------------------------------------------------------ the steps
    def decode_boxes(self, pred_dist: Tensor, anchor_points: Tensor) -> Tensor:
        """Predicted xyxy boxes around ``anchor_points`` (their units) from the head's box
        channels: the expectation of each side's distribution (:func:`decode_distances`), or
        the distances themselves when ``reg_max`` is 1."""
        if self.reg_max == 1:
            lt, rb = pred_dist.chunk(2, -1)
            return torch.cat((anchor_points - lt, anchor_points + rb), -1)
        return decode_distances(pred_dist, anchor_points)

    def prepare(self, inputs: YOLOv8Inputs) -> YOLOv8Decoding:
        anchor_points, stride_tensor = make_anchors(inputs.levels, inputs.dtype, inputs.device)
        return YOLOv8Decoding(anchor_points, stride_tensor, self.decode_boxes(inputs.pred_dist, anchor_points))

    def assignment(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding) -> Assignment:
        """The task-aligned assignment (``self.assigner``) on the detached predictions, in pixels;
        ``target_index`` becomes the row of ``targets``."""
        with torch.no_grad():
            stride = prepared.stride_tensor
            asg = self.assigner.assign(
                inputs.pred_logits.detach().sigmoid(),
                prepared.pred_bboxes.detach() * stride,
                prepared.anchor_points * stride,
                inputs.gt_labels,
                inputs.gt_bboxes,
                inputs.mask_gt,
                inputs.levels,
            )
            return replace(asg, target_index=inputs.gt_rows[asg.batch_index, asg.target_index])

    def gather(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment) -> YOLOv8Decoding:
        b, a = assignment.batch_index, assignment.pred_index
        pos_strides = prepared.stride_tensor[a]
        score_sum = assignment.extras["target_scores"].sum()
        if self.reduce_across_ranks:
            # one all-reduce for both: the mean target-score sum and the global batch size
            local = torch.stack((score_sum.detach(), score_sum.new_tensor(float(inputs.batch_size))))
            score_sum, mean_batch = self.global_mean(local).unbind(0)
            batch_factor: Union[int, Tensor] = mean_batch * self.world_size()
        else:
            batch_factor = inputs.batch_size
        return replace(
            prepared,
            pos_anchor_points=prepared.anchor_points[a],
            pos_strides=pos_strides,
            pos_pred_bboxes=prepared.pred_bboxes[b, a],
            pos_pred_dist=inputs.pred_dist[b, a],
            pos_target_bboxes=assignment.boxes / pos_strides,
            normalizer=score_sum.clamp(min=1),
            batch_factor=batch_factor,
        )

    # ------------------------------------------------------------------ the terms
    def cls_term(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """BCE of every class logit against the soft target scores, over S."""
        target_scores = assignment.extras["target_scores"]
        cw = None if self.class_weights is None else self.class_weights.to(inputs.pred_logits)
        return F.bce_with_logits(inputs.pred_logits, target_scores, weight=cw, reduction="sum") / prepared.normalizer

    def box_term(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """``sum w_a (1 - CIoU)`` over the positives, over S."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        ciou = F.aligned_box_iou(
            prepared.pos_pred_bboxes, prepared.pos_target_bboxes, kind="ciou", convention="yolov5", validate=False
        )
        return ((1.0 - ciou) * assignment.weights).sum() / prepared.normalizer

    def dfl_term(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """``sum w_a mean_sides DFL`` over the positives, over S (targets clamped to ``reg_max - 1.01``)."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        reg_max = self.reg_max
        anchor, target = prepared.pos_anchor_points, prepared.pos_target_bboxes
        ltrb = torch.cat((anchor - target[:, :2], target[:, 2:] - anchor), -1).clamp(0, reg_max - 1 - DFL_MARGIN)
        dfl = F.distribution_focal_loss(prepared.pos_pred_dist.reshape(-1, reg_max), ltrb.reshape(-1), reduction="none")
        return (dfl.view(-1, 4).mean(-1) * assignment.weights).sum() / prepared.normalizer

    def l1_term(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """``reg_max`` 1: ``sum w_a mean_sides |d - t| * stride / (W, H, W, H)`` over the positives, over S."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        anchor, target = prepared.pos_anchor_points, prepared.pos_target_bboxes
        ltrb = torch.cat((anchor - target[:, :2], target[:, 2:] - anchor), -1)
        h, w = inputs.image_hw
        scale = prepared.pos_strides / ltrb.new_tensor([w, h, w, h])
        l1 = F.l1_loss(prepared.pos_pred_dist * scale, ltrb * scale, reduction="none")
        return (l1.mean(-1) * assignment.weights).sum() / prepared.normalizer

    def batch_factor(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding) -> Union[int, Tensor]:
        """``total = (box + cls + dfl) * B`` (ultralytics' return value)."""
        return prepared.batch_factor

    def stats(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment, raw: Dict[str, Tensor]) -> Dict[str, Any]:
        n_rows = inputs.targets.shape[0]
        matched = torch.zeros(max(n_rows, 1), dtype=torch.bool, device=inputs.device)
        matched[assignment.target_index] = True
        iou_mean: Union[float, Tensor] = 0.0
        ciou_mean: Union[float, Tensor] = 0.0
        if assignment.num_pos:
            pred_px = prepared.pos_pred_bboxes.detach() * prepared.pos_strides
            iou_mean = F.aligned_box_iou(pred_px, assignment.boxes, convention="yolov5", validate=False).mean()
            ciou_mean = F.aligned_box_iou(
                pred_px, assignment.boxes, kind="ciou", convention="yolov5", validate=False
            ).mean()
        return {
            "num_pos": assignment.num_pos,
            "num_targets": inputs.mask_gt.sum(),
            "matched_targets": matched.sum(),
            "normalizer": prepared.normalizer,
            "target_scores_sum": prepared.normalizer,
            "iou_mean": iou_mean,
            "ciou_mean": ciou_mean,
        }

    # ------------------------------------------------------------------ inference
    def decode(self, feats: Sequence[Tensor]) -> Decoded:
        """The detector's inference decoding of ``feats`` (as ``forward`` takes them): boxes
        ``[B, A, 4]`` xyxy pixels (each side the expectation of its distribution, times the
        stride) and class scores ``sigmoid(logits)`` ``[B, A, nc]``, computed in float32 or wider."""
        levels = self._check_feats(feats)
        dt = compute_dtype(*feats)
        pred_dist, pred_logits = self._split(feats, dt)
        anchor_points, stride_tensor = make_anchors(levels, dt, feats[0].device)
        boxes = self.decode_boxes(pred_dist, anchor_points) * stride_tensor
        return Decoded(boxes, pred_logits.sigmoid())

    def prior_outputs(self, image_size: Tuple[int, int], batch_size: int = 1) -> Tuple[List[Tensor]]:
        h, w = image_size
        no = 4 * self.reg_max + self.num_classes
        return ([torch.zeros(batch_size, no, math.ceil(h / s), math.ceil(w / s), dtype=torch.float64) for s in self.strides],)

    def prediction_levels(self, feats: Sequence[Tensor]) -> List[GridLevel]:
        """One anchor point per cell, at the cell centre."""
        return [GridLevel(s, (int(f.shape[2]), int(f.shape[3])), (s, s)) for f, s in zip(feats, self.strides)]
