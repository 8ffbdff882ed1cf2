r"""FCOS loss: focal classification, IoU-family box regression and centerness, over all points.

Tian et al. 2019, "FCOS: Fully Convolutional One-Stage Object Detection" (arXiv:1904.01355).
Every feature-map point is a sample (assignment: :mod:`detloss.assign.fcos`). With ``fg`` the
foreground points, ``y`` the one-hot class targets (all zeros on background) and ``N`` the
normalizer,

.. math::
    L = \frac{1}{N}\sum_{\text{points, classes}} \mathrm{FL}(x, y)
      + \frac{1}{N_{box}} \sum_{fg} w\,\ell_{box}(\hat b, b)
      + \frac{1}{N}\sum_{fg} \mathrm{BCE}(c, c^*), \qquad
    c^* = \sqrt{\frac{\min(l, r)}{\max(l, r)}\cdot\frac{\min(t, b)}{\max(t, b)}}

where ``FL`` is the sigmoid focal loss (alpha 0.25, gamma 2) and ``(l, t, r, b)`` the distances
from the point to the sides of its box.

``convention="torchvision"`` is ``torchvision.models.detection.FCOS.compute_loss`` +
``FCOSHead.compute_loss`` (torchvision 0.29): ``l_box`` the GIoU loss of boxes decoded by
``BoxLinearCoder(normalize_by_size=True)`` (``box = (px - l s, py - t s, px + r s, py + b s)``,
``s`` the anchor side), ``w = 1``, ``N = N_box = max(1, number of foreground points)``.

``convention="mmdet"`` is mmdetection 3.x ``FCOSHead.loss_by_feat``: ``bbox_regression`` holds
distances in pixels (in strides with ``norm_on_bbox``), boxes decoded around cell-centre points,
``l_box`` from ``box_loss`` (mmdet's default ``IoULoss`` is ``"log_iou"``), weighted by
``w = c*`` and normalized by ``N_box = max(mean over ranks of sum c*, 1e-6)``; ``N = max(mean over
ranks of the number of positives, 1)``; every sum is divided by ``avg_factor + eps`` (``eps`` =
float32 machine epsilon) as mmdet's ``weight_reduce_loss`` does. Remaining differences from mmdet:
the IoU-family losses use torchvision's ``eps`` placement (``inter / (union + eps)``) instead of
mmdet's ``clamp(union, min=eps)``, a difference of order 1e-7 relative.

Distributed training (DDP averages gradients over the ``W`` ranks): with
``reduce_across_ranks=True`` and ``torch.distributed`` initialized, the normalizers are computed
over all ranks (one all-reduce per call). ``torchvision``: each rank divides by
``max(1, N_all) / W`` (``N_all`` the foreground count of the whole global batch), so the averaged
gradient is exactly the single-process gradient of the whole batch, and the mean over ranks of
the reported losses equals the whole-batch loss. ``mmdet``: mmdet's ``reduce_mean`` normalizers
(``max(N_all / W, 1)``, ``max(sum c*_all / W, 1e-6)``) give the same equivalence whenever the
global batch has at least ``W`` positives (and up to mmdet's ``eps``, a 1e-7 relative effect).
The default (False) issues no collective, as torchvision itself: each rank normalizes by its own
positives (mmdet's ``reduce_mean`` is that too on one process).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import functional as F
from .._checks import as_pair, check_choice, check_finite, check_floating, check_tensor, compute_dtype, upcast
from ..assign.fcos import (
    CONVENTIONS,
    DEFAULT_STRIDES,
    FCOSAssignment,
    PointGrid,
    _assignment,
    check_feature_sizes,
    check_targets,
    make_point_grid,
    match_boxes,
)
from ..boxes import check_yolo_targets, yolo_rows_to_targets
from ..anchors import GridLevel
from .base import Decoded, DetectionLoss

__all__ = ["FCOSLoss", "BOX_LOSSES"]

BOX_LOSSES = ("iou", "log_iou", "giou", "diou", "ciou")
MMDET_AVG_EPS = torch.finfo(torch.float32).eps  # mmdet weight_reduce_loss: sum / (avg_factor + eps)
MMDET_IOU_EPS = 1e-6  # mmdet IoULoss(eps=1e-6): -log(clamp(iou, min=eps))
MMDET_MIN_CENTERNESS_DENORM = 1e-6


@dataclass
class FCOSInputs:
    """Checked inputs of :class:`FCOSLoss`: the three head outputs, the feature sizes, the
    targets as ``(boxes, labels)`` per image, the image size, the compute dtype of the heads and
    the one the assignment is decided in (the boxes' too)."""

    cls_logits: Tensor
    bbox_regression: Tensor
    centerness: Tensor
    feature_sizes: List[Tuple[int, int]]
    pairs: List[Tuple[Tensor, Tensor]]
    image_size: Optional[Tuple[int, int]]
    dtype: torch.dtype
    assign_dtype: torch.dtype


@dataclass
class FCOSPositives:
    """The point grid (:meth:`FCOSLoss.prepare`), then per positive (:meth:`FCOSLoss.gather`) its
    regression outputs and centerness logit, point, box scale, target box, the decoded box and
    regression target in the convention's units, the centerness target, and the normalizers."""

    grid: PointGrid
    reg: Optional[Tensor] = None
    ctr_logit: Optional[Tensor] = None
    points: Optional[Tensor] = None
    scale: Optional[Tensor] = None
    gt: Optional[Tensor] = None
    pred_boxes: Optional[Tensor] = None
    target_boxes: Optional[Tensor] = None
    pred_boxes_px: Optional[Tensor] = None
    ctr_target: Optional[Tensor] = None
    num_pos_total: float = 0.0
    normalizer: float = 1.0
    box_normalizer: float = 1.0


class FCOSLoss(DetectionLoss):
    """FCOS loss with torchvision's (default) or mmdetection's convention.

    Args:
        num_classes: number of classes ``C`` (the width of ``cls_logits``).
        strides: stride per pyramid level (P3-P7 by default).
        center_sampling_radius: centre-sampling radius in strides (torchvision: anchor sides);
            default 1.5 (both originals).
        convention: ``"torchvision"`` or ``"mmdet"`` (module docstring).
        center_sampling: turn centre sampling on or off; default on for torchvision (always on
            there), off for mmdet (``FCOSHead(center_sampling=False)``).
        center_sample_radius: mmdet's name for ``center_sampling_radius``; overrides it when given.
        norm_on_bbox: mmdet only: ``bbox_regression`` and the distance targets are in strides.
        box_loss: ``"iou"`` (1 - IoU), ``"log_iou"`` (-log IoU), ``"giou"``, ``"diou"``, ``"ciou"``;
            default ``"giou"`` for torchvision (the only one it has), ``"log_iou"`` for mmdet
            (``IoULoss``, its head's default; its improved configs use ``"giou"``).
        anchor_sizes: torchvision's anchor side per level (default: the strides).
        regress_ranges: mmdet's ``(lower, upper)`` per level (default: mmdet's).
        focal_alpha, focal_gamma: focal loss hyperparameters (0.25, 2.0 in both originals).
        cls_weight, box_weight, centerness_weight: multipliers of the three terms (1.0); the
            loss's ``gains`` ``"cls"``, ``"box"``, ``"centerness"``.
        reduce_across_ranks: compute the normalizers over all ranks (module docstring); default
            False, torchvision's behaviour, which issues no collective.

    Call ``loss_fn(cls_logits [B, P, C], bbox_regression [B, P, 4], centerness [B, P, 1] or [B, P],
    feature_sizes, targets, image_size=None)``: ``P`` is the sum of ``H * W`` over
    ``feature_sizes`` (levels concatenated, each row-major), ``targets`` a list of per-image
    ``{"boxes": [n, 4] xyxy pixels, "labels": [n] int64}`` or YOLO rows ``[N, 6]``
    ``(image_index, class, cx, cy, w, h)`` normalized (then ``image_size=(h, w)`` is required;
    the rows are checked by :func:`detloss.boxes.check_yolo_targets` as in the YOLO losses and
    become pixels in float32 or wider, :func:`detloss.boxes.yolo_rows_to_targets`). Non-finite
    head outputs are a ValueError naming the argument. With torchvision's convention a given
    ``image_size`` also sets the point spacing to ``image_size // feature_size``, as its
    AnchorGenerator does.

    Returns a :class:`~detloss.LossOutput`: ``total = cls + box + centerness`` (weighted);
    ``components`` ``"cls"``, ``"box"``, ``"centerness"`` (torchvision's ``classification``,
    ``bbox_regression``, ``bbox_ctrness``) and ``terms`` the same with their graph; ``stats``:
    ``num_pos`` (this rank), ``num_pos_per_level``, ``num_pos_total`` (all ranks), ``num_targets``,
    ``normalizer``, ``box_normalizer``, ``iou_mean`` (mean IoU of the decoded boxes of positives
    with their targets, 0.0 when none). :meth:`assign` (``forward``'s arguments) gives the
    :class:`~detloss.assign.fcos.FCOSAssignment`; :meth:`decode` the inference boxes and scores.
    """

    name = "fcos"
    term_methods = {"cls": "cls_term", "box": "box_term", "centerness": "centerness_term"}

    def __init__(
        self,
        num_classes: int,
        strides: Sequence[int] = DEFAULT_STRIDES,
        center_sampling_radius: float = 1.5,
        convention: str = "torchvision",
        *,
        center_sampling: Optional[bool] = None,
        center_sample_radius: Optional[float] = None,
        norm_on_bbox: bool = False,
        box_loss: Optional[str] = None,
        anchor_sizes: Optional[Sequence[float]] = None,
        regress_ranges: Optional[Sequence[Tuple[float, float]]] = None,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        cls_weight: float = 1.0,
        box_weight: float = 1.0,
        centerness_weight: float = 1.0,
        reduce_across_ranks: bool = False,
    ) -> None:
        super().__init__(
            {"cls": cls_weight, "box": box_weight, "centerness": centerness_weight},
            reduce_across_ranks=reduce_across_ranks,
        )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.convention = check_choice("convention", convention, CONVENTIONS)
        self.strides = tuple(int(s) for s in strides)
        if not self.strides or min(self.strides) <= 0:
            raise ValueError(f"strides: expected positive ints, got {tuple(strides)}")
        if center_sample_radius is not None:
            center_sampling_radius = center_sample_radius
        if not float(center_sampling_radius) > 0:
            raise ValueError(f"center_sampling_radius: expected a positive number, got {center_sampling_radius!r}")
        self.center_sampling_radius = float(center_sampling_radius)
        self.center_sampling = (convention == "torchvision") if center_sampling is None else bool(center_sampling)
        if norm_on_bbox and convention != "mmdet":
            raise ValueError("norm_on_bbox: only meaningful with convention='mmdet'")
        self.norm_on_bbox = bool(norm_on_bbox)
        if box_loss is None:
            box_loss = "giou" if convention == "torchvision" else "log_iou"
        self.box_loss = check_choice("box_loss", box_loss, BOX_LOSSES)
        self.anchor_sizes = None if anchor_sizes is None else tuple(float(a) for a in anchor_sizes)
        self.regress_ranges = None if regress_ranges is None else tuple(tuple(map(float, r)) for r in regress_ranges)
        self.focal_alpha, self.focal_gamma = float(focal_alpha), float(focal_gamma)
        # Fail at construction, not at the first call, on inconsistent level settings.
        self._grid(tuple((1, 1) for _ in self.strides), None, torch.float32, torch.device("cpu"))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, strides={self.strides}, convention={self.convention!r}, "
            f"center_sampling={self.center_sampling}, center_sampling_radius={self.center_sampling_radius}, "
            f"box_loss={self.box_loss!r}, norm_on_bbox={self.norm_on_bbox}, gains={self.gains}, "
            f"reduce_across_ranks={self.reduce_across_ranks}"
        )

    # ----------------------------------------------------------------------------- checks
    def _grid(self, feature_sizes, image_size, dtype, device) -> PointGrid:
        return make_point_grid(
            feature_sizes,
            self.strides,
            convention=self.convention,
            center_sampling_radius=self.center_sampling_radius if self.center_sampling else None,
            anchor_sizes=self.anchor_sizes,
            regress_ranges=self.regress_ranges,
            image_size=image_size,
            dtype=dtype,
            device=device,
        )

    def _targets(self, targets, batch_size: int, image_size) -> List[Tuple[Tensor, Tensor]]:
        if isinstance(targets, Tensor):
            targets = _rows_to_targets(targets, batch_size, self.num_classes, image_size)
        return check_targets(targets, batch_size, self.num_classes)  # type: ignore[return-value]

    def _check_heads(self, cls_logits, bbox_regression, centerness, feature_sizes):
        check_floating("cls_logits", cls_logits)
        check_floating("bbox_regression", bbox_regression)
        check_floating("centerness", centerness)
        if cls_logits.ndim != 3 or cls_logits.shape[2] != self.num_classes:
            raise ValueError(
                f"cls_logits: expected shape [B, P, {self.num_classes}], got {tuple(cls_logits.shape)}"
            )
        b, p = cls_logits.shape[:2]
        if tuple(bbox_regression.shape) != (b, p, 4):
            raise ValueError(f"bbox_regression: expected shape {(b, p, 4)}, got {tuple(bbox_regression.shape)}")
        if tuple(centerness.shape) not in ((b, p, 1), (b, p)):
            raise ValueError(f"centerness: expected shape {(b, p, 1)} or {(b, p)}, got {tuple(centerness.shape)}")
        check_finite(("cls_logits", "bbox_regression", "centerness"), (cls_logits, bbox_regression, centerness))
        sizes = check_feature_sizes(feature_sizes, len(self.strides))
        total = sum(h * w for h, w in sizes)
        if total != p:
            raise ValueError(
                f"feature_sizes: expected sizes whose H * W add up to the {p} points of cls_logits, "
                f"got {sizes} adding up to {total}"
            )
        return sizes

    def check(
        self,
        cls_logits: Tensor,
        bbox_regression: Tensor,
        centerness: Tensor,
        feature_sizes: Sequence[Tuple[int, int]],
        targets: Union[Sequence[Dict[str, Tensor]], Tensor],
        image_size: Optional[Tuple[int, int]] = None,
    ) -> FCOSInputs:
        sizes = self._check_heads(cls_logits, bbox_regression, centerness, feature_sizes)
        pairs = self._targets(targets, cls_logits.shape[0], image_size)
        dtype = compute_dtype(cls_logits, bbox_regression, centerness)
        assign_dtype = compute_dtype(cls_logits, bbox_regression, centerness, *(b for b, _ in pairs))
        return FCOSInputs(cls_logits, bbox_regression, centerness, sizes, pairs, image_size, dtype, assign_dtype)

    # ----------------------------------------------------------------------------- the steps
    def prepare(self, inputs: FCOSInputs) -> FCOSPositives:
        return FCOSPositives(self._grid(inputs.feature_sizes, inputs.image_size, inputs.assign_dtype, inputs.cls_logits.device))

    def assignment(self, inputs: FCOSInputs, prepared: FCOSPositives) -> FCOSAssignment:
        """The points' boxes (:func:`detloss.assign.fcos.match_boxes`), decided in the boxes' dtype."""
        boxes_list = [b for b, _ in inputs.pairs]
        matched = match_boxes(boxes_list, prepared.grid, self.convention, inputs.assign_dtype)
        return _assignment(matched, boxes_list, [lb for _, lb in inputs.pairs], prepared.grid)

    def gather(self, inputs: FCOSInputs, prepared: FCOSPositives, assignment: FCOSAssignment) -> FCOSPositives:
        dtype, grid = inputs.dtype, prepared.grid
        flat = assignment.flat_index
        reg = upcast(inputs.bbox_regression, dtype).reshape(-1, 4)[flat]
        ctr_logit = upcast(inputs.centerness, dtype).reshape(-1)[flat]
        pts = grid.points[assignment.pred_index].to(dtype)
        scale = grid.scales[assignment.pred_index].to(dtype)
        gt = assignment.boxes.to(dtype)
        num_pos = float(assignment.num_pos)
        if self.convention == "torchvision":
            # BoxLinearCoder(normalize_by_size=True): distances are in anchor sides.
            d = reg * scale[:, None]
            pred = torch.cat((pts - d[:, :2], pts + d[:, 2:]), dim=1)
            target_boxes, pred_px = gt, pred
            ctr_target = _centerness_target(torch.cat((pts - gt[:, :2], gt[:, 2:] - pts), dim=1) / scale[:, None])
            mean_pos = float(self.global_mean(torch.tensor(num_pos, dtype=torch.float64)))
            world = self.world_size()
            n_all = mean_pos * world
            normalizer = box_normalizer = max(1.0, n_all) / world
        else:
            target = torch.cat((pts - gt[:, :2], gt[:, 2:] - pts), dim=1)
            if self.norm_on_bbox:
                target = target / scale[:, None]
            ctr_target = _centerness_target(target)
            # mmdet decodes prediction and target around the point in the same units (IoU is
            # invariant to that common scale and shift)
            pred = torch.cat((pts - reg[:, :2], pts + reg[:, 2:]), dim=1)
            target_boxes = torch.cat((pts - target[:, :2], pts + target[:, 2:]), dim=1)
            pred_px = pred if not self.norm_on_bbox else torch.cat(
                (pts - reg[:, :2] * scale[:, None], pts + reg[:, 2:] * scale[:, None]), dim=1
            )
            local = torch.stack((torch.tensor(num_pos, dtype=ctr_target.dtype, device=ctr_target.device), ctr_target.sum().detach()))
            mean_pos, mean_ctr = (float(v) for v in self.global_mean(local).tolist())
            n_all = mean_pos * self.world_size()
            normalizer = max(mean_pos, 1.0)
            box_normalizer = max(mean_ctr, MMDET_MIN_CENTERNESS_DENORM)
        return replace(
            prepared, reg=reg, ctr_logit=ctr_logit, points=pts, scale=scale, gt=gt, pred_boxes=pred,
            target_boxes=target_boxes, pred_boxes_px=pred_px, ctr_target=ctr_target,
            num_pos_total=n_all, normalizer=normalizer, box_normalizer=box_normalizer,
        )

    def _divisor(self, normalizer: float) -> float:
        """mmdet's ``weight_reduce_loss`` divides by ``avg_factor + eps``; torchvision by the normalizer."""
        return normalizer + MMDET_AVG_EPS if self.convention == "mmdet" else normalizer

    # ----------------------------------------------------------------------------- the terms
    def cls_term(self, inputs: FCOSInputs, pos: FCOSPositives, assignment: FCOSAssignment) -> Tensor:
        """Focal loss over every point and class (one-hot targets on positives), over N."""
        batch, num_points, num_classes = inputs.cls_logits.shape
        cls_target = torch.zeros((batch * num_points, num_classes), dtype=inputs.dtype, device=inputs.cls_logits.device)
        cls_target[assignment.flat_index, assignment.labels] = 1.0
        cls_sum = F.sigmoid_focal_loss(
            inputs.cls_logits.reshape(-1, num_classes), cls_target, alpha=self.focal_alpha, gamma=self.focal_gamma,
            reduction="sum",
        )
        return cls_sum / self._divisor(pos.normalizer)

    def box_term(self, inputs: FCOSInputs, pos: FCOSPositives, assignment: FCOSAssignment) -> Tensor:
        """The IoU-family loss of the decoded boxes (weighted by ``c*`` for mmdet), over N_box."""
        loss = self._box_loss(pos.pred_boxes, pos.target_boxes)
        if self.convention == "mmdet":
            loss = loss * pos.ctr_target
        return loss.sum() / self._divisor(pos.box_normalizer)

    def centerness_term(self, inputs: FCOSInputs, pos: FCOSPositives, assignment: FCOSAssignment) -> Tensor:
        """BCE of the centerness logits of positives against ``c*``, over N."""
        ctr_sum = F.bce_with_logits(pos.ctr_logit, pos.ctr_target, reduction="sum")
        return ctr_sum / self._divisor(pos.normalizer)

    def _box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-positive box loss ``[n]``.

        Decoded predictions may be inverted boxes (negative regression outputs before the
        head's ReLU): both originals compute the loss on them regardless, so the IoU functions
        are called with ``validate=False`` (the same formula, no size check).
        """
        if self.box_loss == "log_iou":
            iou = F.aligned_box_iou(pred, target, kind="iou", convention="torchvision", validate=False)
            return -iou.clamp(min=MMDET_IOU_EPS).log()
        return F.iou_loss(pred, target, kind=self.box_loss, convention="torchvision", reduction="none", validate=False)

    def stats(self, inputs: FCOSInputs, pos: FCOSPositives, assignment: FCOSAssignment, raw: Dict[str, Tensor]) -> Dict[str, Any]:
        iou_mean: Union[float, Tensor] = 0.0
        if assignment.num_pos:
            iou_mean = F.aligned_box_iou(
                pos.pred_boxes_px.detach(), pos.gt, kind="iou", convention="torchvision", validate=False
            ).clamp(0, 1).mean()
        return {
            "num_pos": assignment.num_pos,
            "num_pos_per_level": assignment.num_pos_per_level(),
            "num_pos_total": pos.num_pos_total,
            "num_targets": sum(int(b.shape[0]) for b, _ in inputs.pairs),
            "normalizer": pos.normalizer,
            "box_normalizer": pos.box_normalizer,
            "iou_mean": iou_mean,
        }

    # ----------------------------------------------------------------------------- inference
    def decode(
        self,
        cls_logits: Tensor,
        bbox_regression: Tensor,
        centerness: Tensor,
        feature_sizes: Sequence[Tuple[int, int]],
        image_size: Optional[Tuple[int, int]] = None,
    ) -> Decoded:
        """The detector's inference decoding: boxes ``[B, P, 4]`` xyxy pixels (the convention's
        points and box coding, as in :meth:`gather`) and scores
        ``sqrt(sigmoid(cls) * sigmoid(centerness))`` ``[B, P, C]`` (torchvision's
        ``postprocess_detections``), computed in float32 or wider."""
        sizes = self._check_heads(cls_logits, bbox_regression, centerness, feature_sizes)
        dtype = compute_dtype(cls_logits, bbox_regression, centerness)
        grid = self._grid(sizes, image_size, dtype, cls_logits.device)
        reg = upcast(bbox_regression, dtype)
        if self.convention == "torchvision" or self.norm_on_bbox:
            reg = reg * grid.scales[:, None]
        boxes = torch.cat((grid.points - reg[..., :2], grid.points + reg[..., 2:]), -1)
        ctr = upcast(centerness, dtype).reshape(*centerness.shape[:2], 1)
        scores = (upcast(cls_logits, dtype).sigmoid() * ctr.sigmoid()).sqrt()
        return Decoded(boxes, scores)

    # ----------------------------------------------------------------------------- hooks for the tools
    def prior_outputs(self, image_size: Tuple[int, int], batch_size: int = 1) -> Tuple[Any, ...]:
        h, w = image_size
        sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in self.strides]
        p = sum(a * b for a, b in sizes)
        zeros = [torch.zeros(batch_size, p, c, dtype=torch.float64) for c in (self.num_classes, 4, 1)]
        return (*zeros, sizes)

    def call_kwargs(self, image_size: Tuple[int, int]) -> Dict[str, Any]:
        """``image_size``: torchvision's point spacing (``image // feature``), and the pixel
        scale of YOLO-row targets."""
        return {"image_size": tuple(int(v) for v in image_size)}

    def prediction_levels(self, cls_logits, bbox_regression, centerness, feature_sizes, image_size=None) -> List[GridLevel]:
        """One point per cell where the convention puts it (torchvision: the cell's corner at
        ``image // feature`` spacing; mmdet: its centre)."""
        sizes = check_feature_sizes(feature_sizes, len(self.strides))
        grid = self._grid(sizes, image_size, torch.float64, torch.device("cpu"))
        offset = 0.0 if self.convention == "torchvision" else 0.5
        return [GridLevel(float(s), size, sp, offset) for s, size, sp in zip(self.strides, sizes, grid.spacing)]


def _centerness_target(ltrb: Tensor) -> Tensor:
    """``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` (FCOS eq. 3) for ``[n, 4]`` (l, t, r, b)."""
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    ratio = (lr.min(dim=-1).values / lr.max(dim=-1).values) * (tb.min(dim=-1).values / tb.max(dim=-1).values)
    return torch.sqrt(ratio)


def _rows_to_targets(rows: Tensor, batch_size: int, num_classes: int, image_size) -> List[Dict[str, Tensor]]:
    """YOLO rows ``[N, 6]`` -> per-image dicts of xyxy pixels (float32 or wider), the rows checked
    as every YOLO loss checks them (:func:`detloss.boxes.check_yolo_targets`: finite, an image of
    the batch, a class below ``num_classes``, ``cx, cy, w, h`` in [0, 1])."""
    check_tensor("targets", rows)
    if image_size is None:
        raise ValueError("image_size: required (h, w) in pixels when targets are YOLO rows [N, 6]")
    image_size = as_pair("image_size", image_size)
    rows = check_yolo_targets(rows, num_classes=num_classes, batch_size=batch_size)
    return yolo_rows_to_targets(rows.detach(), batch_size, image_size)
