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

Distributed training (DDP averages gradients over the ``W`` ranks): when ``torch.distributed``
is initialized and ``sync_normalizers`` is true, the normalizers are computed over all ranks.
``torchvision``: each rank divides by ``max(1, N_all) / W`` (``N_all`` the foreground count of
the whole global batch), so the averaged gradient is exactly the single-process gradient of the
whole batch, and the mean over ranks of the reported losses equals the whole-batch loss.
``mmdet``: mmdet's ``reduce_mean`` normalizers (``max(N_all / W, 1)``, ``max(sum c*_all / W,
1e-6)``) give the same equivalence whenever the global batch has at least ``W`` positives (and up
to mmdet's ``eps``, a 1e-7 relative effect). ``torchvision`` itself does not synchronize; pass
``sync_normalizers=False`` for its per-rank behaviour.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import distributed as dist
from .. import functional as F
from .._checks import as_pair, check_choice, check_floating, check_tensor, compute_dtype, upcast
from ..assign.fcos import (
    CONVENTIONS,
    DEFAULT_STRIDES,
    FCOSAssignment,
    PointGrid,
    check_feature_sizes,
    check_targets,
    make_point_grid,
    match_boxes,
)
from ..boxes import yolo_rows_to_targets
from ..functional.iou import _box_iou_formula, _iou_loss_formula
from ..output import LossOutput

__all__ = ["FCOSLoss", "BOX_LOSSES"]

BOX_LOSSES = ("iou", "log_iou", "giou", "diou", "ciou")
MMDET_AVG_EPS = torch.finfo(torch.float32).eps  # mmdet weight_reduce_loss: sum / (avg_factor + eps)
MMDET_IOU_EPS = 1e-6  # mmdet IoULoss(eps=1e-6): -log(clamp(iou, min=eps))
MMDET_MIN_CENTERNESS_DENORM = 1e-6


class FCOSLoss(torch.nn.Module):
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
        cls_weight, box_weight, centerness_weight: multipliers of the three terms (1.0).
        sync_normalizers: compute normalizers over all ranks when distributed (default True).

    Call ``loss_fn(cls_logits [B, P, C], bbox_regression [B, P, 4], centerness [B, P, 1] or [B, P],
    feature_sizes, targets, image_size=None)``: ``P`` is the sum of ``H * W`` over
    ``feature_sizes`` (levels concatenated, each row-major), ``targets`` a list of per-image
    ``{"boxes": [n, 4] xyxy pixels, "labels": [n] int64}`` or YOLO rows ``[N, 6]``
    ``(image_index, class, cx, cy, w, h)`` normalized (then ``image_size=(h, w)`` is required,
    see :func:`detloss.boxes.yolo_rows_to_targets`). With torchvision's convention a given
    ``image_size`` also sets the point spacing to ``image_size // feature_size``, as its
    AnchorGenerator does.

    Returns a :class:`~detloss.LossOutput`: ``total = cls + box + centerness`` (weighted);
    ``components`` ``"cls"``, ``"box"``, ``"centerness"`` (torchvision's ``classification``,
    ``bbox_regression``, ``bbox_ctrness``); ``stats``: ``num_pos`` (this rank), ``num_pos_per_level``,
    ``num_pos_total`` (all ranks), ``num_targets``, ``normalizer``, ``box_normalizer``,
    ``mean_iou`` (mean IoU of the decoded boxes of positives with their targets, 0 when none).
    """

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
        sync_normalizers: bool = True,
    ) -> None:
        super().__init__()
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
        self.cls_weight, self.box_weight = float(cls_weight), float(box_weight)
        self.centerness_weight = float(centerness_weight)
        self.sync_normalizers = bool(sync_normalizers)
        # Fail at construction, not at the first call, on inconsistent level settings.
        self._grid(tuple((1, 1) for _ in self.strides), None, torch.float32, torch.device("cpu"))

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, strides={self.strides}, convention={self.convention!r}, "
            f"center_sampling={self.center_sampling}, center_sampling_radius={self.center_sampling_radius}, "
            f"box_loss={self.box_loss!r}, norm_on_bbox={self.norm_on_bbox}"
        )

    # ----------------------------------------------------------------------------- assignment
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
            targets = _rows_to_targets(targets, batch_size, image_size)
        return check_targets(targets, batch_size, self.num_classes)  # type: ignore[return-value]

    def assign(
        self,
        feature_sizes: Sequence[Tuple[int, int]],
        targets: Union[Sequence[Dict[str, Tensor]], Tensor],
        image_size: Optional[Tuple[int, int]] = None,
        batch_size: Optional[int] = None,
    ) -> FCOSAssignment:
        """The assignment this loss uses (see :func:`detloss.assign.fcos.assign_fcos`)."""
        if batch_size is None:
            if isinstance(targets, Tensor):
                raise ValueError("batch_size: required with YOLO rows targets")
            batch_size = len(targets)
        pairs = self._targets(targets, batch_size, image_size)
        dtype = compute_dtype(*(b for b, _ in pairs))
        device = pairs[0][0].device if pairs else torch.device("cpu")
        grid = self._grid(check_feature_sizes(feature_sizes, len(self.strides)), image_size, dtype, device)
        matched = match_boxes([b for b, _ in pairs], grid, self.convention, dtype)
        return FCOSAssignment(matched_idxs=matched, levels=grid.levels, grid=grid)

    # ----------------------------------------------------------------------------- loss
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
        sizes = check_feature_sizes(feature_sizes, len(self.strides))
        total = sum(h * w for h, w in sizes)
        if total != p:
            raise ValueError(
                f"feature_sizes: expected sizes whose H * W add up to the {p} points of cls_logits, "
                f"got {sizes} adding up to {total}"
            )
        return sizes

    def forward(
        self,
        cls_logits: Tensor,
        bbox_regression: Tensor,
        centerness: Tensor,
        feature_sizes: Sequence[Tuple[int, int]],
        targets: Union[Sequence[Dict[str, Tensor]], Tensor],
        image_size: Optional[Tuple[int, int]] = None,
    ) -> LossOutput:
        """Check inputs, assign points, gather positives, compute the three terms, normalize.

        See the class docstring for the shapes; returns a :class:`~detloss.LossOutput`.
        """
        sizes = self._check_heads(cls_logits, bbox_regression, centerness, feature_sizes)
        batch, num_points, num_classes = cls_logits.shape
        pairs = self._targets(targets, batch, image_size)
        boxes_list = [b for b, _ in pairs]
        dtype = compute_dtype(cls_logits, bbox_regression, centerness)
        assign_dtype = compute_dtype(cls_logits, bbox_regression, centerness, *boxes_list)
        device = cls_logits.device
        grid = self._grid(sizes, image_size, assign_dtype, device)
        matched = match_boxes(boxes_list, grid, self.convention, assign_dtype).view(-1)

        # Gather the positives: flat index b * P + p, their box, label, point and scale.
        pos = (matched >= 0).nonzero().squeeze(1)
        counts = torch.tensor([b.shape[0] for b in boxes_list], device=device)
        first_box = torch.cumsum(counts, 0) - counts
        img, point = torch.div(pos, num_points, rounding_mode="floor"), pos % num_points
        gidx = first_box[img] + matched[pos]
        if len(pos):
            gt = torch.cat([b.to(device=device, dtype=dtype) for b in boxes_list])[gidx]
            labels = torch.cat([lb.to(device) for _, lb in pairs])[gidx]
        else:
            gt = torch.zeros((0, 4), dtype=dtype, device=device)
            labels = torch.zeros((0,), dtype=torch.int64, device=device)
        pts = grid.points[point].to(dtype)
        scale = grid.scales[point].to(dtype)
        num_pos = int(pos.numel())

        # Classification: focal loss over every point and class; one-hot targets on positives.
        cls_target = torch.zeros((batch * num_points, num_classes), dtype=dtype, device=device)
        cls_target[pos, labels] = 1.0
        cls_sum = F.sigmoid_focal_loss(
            cls_logits.reshape(-1, num_classes), cls_target, alpha=self.focal_alpha, gamma=self.focal_gamma,
            reduction="sum",
        )

        reg = upcast(bbox_regression, dtype).reshape(-1, 4)[pos]
        ctr_logit = upcast(centerness, dtype).reshape(-1)[pos]
        if self.convention == "torchvision":
            out = self._torchvision_terms(cls_sum, reg, ctr_logit, gt, pts, scale, num_pos, dtype)
        else:
            out = self._mmdet_terms(cls_sum, reg, ctr_logit, gt, pts, scale, num_pos, dtype)
        cls, box, ctr, pred_boxes, stats = out

        cls, box, ctr = self.cls_weight * cls, self.box_weight * box, self.centerness_weight * ctr
        total = cls + box + ctr
        with torch.no_grad():
            if num_pos:
                iou = _box_iou_formula(pred_boxes.detach(), gt, kind="iou", convention="torchvision").clamp(0, 1)
                mean_iou = float(iou.mean())
            else:
                mean_iou = 0.0
        levels = grid.levels[point]
        stats.update(
            num_pos=num_pos,
            num_pos_per_level=torch.bincount(levels, minlength=len(sizes)).tolist(),
            num_targets=int(counts.sum()),
            mean_iou=mean_iou,
        )
        components = {"cls": cls.detach(), "box": box.detach(), "centerness": ctr.detach()}
        return LossOutput(total=total, components=components, stats=stats)

    def _num_pos_all(self, num_pos: int, dtype, device) -> Tensor:
        n = torch.tensor(float(num_pos), dtype=dtype, device=device)
        return dist.reduce_sum(n) if self.sync_normalizers else n

    def _world(self) -> int:
        return dist.world_size() if self.sync_normalizers else 1

    def _torchvision_terms(self, cls_sum, reg, ctr_logit, gt, pts, scale, num_pos, dtype):
        n_all = self._num_pos_all(num_pos, dtype, cls_sum.device)
        normalizer = float(max(1.0, float(n_all))) / self._world()
        # BoxLinearCoder(normalize_by_size=True).decode: distances are in anchor sides.
        d = reg * scale[:, None]
        pred = torch.cat((pts - d[:, :2], pts + d[:, 2:]), dim=1)
        box_sum = self._box_loss(pred, gt).sum()
        # ... and .encode of the target box, for the centerness target.
        target = torch.cat((pts - gt[:, :2], gt[:, 2:] - pts), dim=1) / scale[:, None]
        ctr_target = _centerness_target(target)
        ctr_sum = F.bce_with_logits(ctr_logit, ctr_target, reduction="sum")
        stats = {"num_pos_total": float(n_all), "normalizer": normalizer, "box_normalizer": normalizer}
        return cls_sum / normalizer, box_sum / normalizer, ctr_sum / normalizer, pred, stats

    def _mmdet_terms(self, cls_sum, reg, ctr_logit, gt, pts, scale, num_pos, dtype):
        world = self._world()
        n_all = self._num_pos_all(num_pos, dtype, cls_sum.device)
        normalizer = max(float(n_all) / world, 1.0)
        target = torch.cat((pts - gt[:, :2], gt[:, 2:] - pts), dim=1)
        if self.norm_on_bbox:
            target = target / scale[:, None]
        ctr_target = _centerness_target(target)
        ctr_sum_all = ctr_target.sum().detach()
        if self.sync_normalizers:
            ctr_sum_all = dist.reduce_sum(ctr_sum_all)
        box_normalizer = max(float(ctr_sum_all) / world, MMDET_MIN_CENTERNESS_DENORM)
        # mmdet decodes prediction and target around the point in the same units (IoU is
        # invariant to that common scale and shift).
        pred = torch.cat((pts - reg[:, :2], pts + reg[:, 2:]), dim=1)
        target_box = torch.cat((pts - target[:, :2], pts + target[:, 2:]), dim=1)
        box_sum = (self._box_loss(pred, target_box) * ctr_target).sum()
        ctr_sum = F.bce_with_logits(ctr_logit, ctr_target, reduction="sum")
        n = normalizer + MMDET_AVG_EPS
        stats = {"num_pos_total": float(n_all), "normalizer": normalizer, "box_normalizer": box_normalizer}
        # For the IoU statistic, compare boxes in pixels.
        pred_px = pred if not self.norm_on_bbox else torch.cat(
            (pts - reg[:, :2] * scale[:, None], pts + reg[:, 2:] * scale[:, None]), dim=1
        )
        return cls_sum / n, box_sum / (box_normalizer + MMDET_AVG_EPS), ctr_sum / n, pred_px, stats

    def _box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Per-positive box loss ``[n]``.

        Decoded predictions may be inverted boxes (negative regression outputs before the
        head's ReLU): both originals compute the loss on them regardless, so the unchecked
        formulas of :mod:`detloss.functional.iou` are used (same arithmetic as ``iou_loss``).
        """
        if self.box_loss == "log_iou":
            iou = _box_iou_formula(pred, target, kind="iou", convention="torchvision")
            return -iou.clamp(min=MMDET_IOU_EPS).log()
        return _iou_loss_formula(pred, target, kind=self.box_loss, convention="torchvision", reduction="none")


def _centerness_target(ltrb: Tensor) -> Tensor:
    """``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))`` (FCOS eq. 3) for ``[n, 4]`` (l, t, r, b)."""
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    ratio = (lr.min(dim=-1).values / lr.max(dim=-1).values) * (tb.min(dim=-1).values / tb.max(dim=-1).values)
    return torch.sqrt(ratio)


def _rows_to_targets(rows: Tensor, batch_size: int, image_size) -> List[Dict[str, Tensor]]:
    """YOLO rows ``[N, 6]`` -> per-image dicts, refusing rows that name no image of the batch."""
    check_tensor("targets", rows)
    if image_size is None:
        raise ValueError("image_size: required (h, w) in pixels when targets are YOLO rows [N, 6]")
    image_size = as_pair("image_size", image_size)
    if rows.ndim != 2 or rows.shape[1] != 6:
        raise ValueError(f"targets: expected YOLO rows of shape [N, 6] or a list of dicts, got {tuple(rows.shape)}")
    check_floating("targets", rows)
    idx = rows[:, 0]
    bad = (idx != idx.round()) | (idx < 0) | (idx >= batch_size)
    if bad.any():
        r = int(bad.nonzero()[0])
        raise ValueError(
            f"targets: expected image indices (column 0) in [0, {batch_size}), row {r} is {rows[r].tolist()}"
        )
    bad = (rows[:, 1] != rows[:, 1].round())
    if bad.any():
        r = int(bad.nonzero()[0])
        raise ValueError(f"targets: expected integer classes (column 1), row {r} is {rows[r].tolist()}")
    return yolo_rows_to_targets(rows.detach(), batch_size, image_size)

