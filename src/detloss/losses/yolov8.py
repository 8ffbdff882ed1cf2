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
import warnings
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import functional as F
from .. import kernels
from .._checks import autocast_off, check_floating, check_level_sizes, check_tensor, compute_dtype, upcast
from .._lazy import Deferred, DeferredField
from ..anchors import GridLevel, Level, make_anchors
from ..assign.base import Assignment
from ..assign.tal import TALAssignment, TaskAlignedAssigner
from ..boxes import check_yolo_targets, cxcywh_to_xyxy, image_counts, image_slots, yolo_target_flags, yolo_target_rows
from ..functional.dfl import dfl_in_range
from ..output import LossOutput
from ._head_maps import HeadMaps, head_terms
from ._rows import gather_rows
from .base import Decoded, DetectionLoss

__all__ = ["YOLOv8Loss", "YOLOv8Inputs", "YOLOv8Decoding", "PaddingRuleWarning", "make_anchors", "decode_distances", "preprocess_targets"]

#: DFL targets are clamped to ``reg_max - 1 - DFL_MARGIN`` (ultralytics ``bbox2dist`` / ``DFLoss``).
DFL_MARGIN = 0.01
#: Rows (image x anchor) decoded per block for the assigner (:meth:`YOLOv8Loss.prepare`):
#: 16384 rows of 64 logits keep the softmax's temporaries at 4 MiB each.
DECODE_BLOCK_ROWS = 1 << 14


def decode_distances(pred_dist: Tensor, anchor_points: Tensor) -> Tensor:
    """Expected ltrb distances of the box-side distributions ``[..., A, 4 * reg_max]`` (side
    major) and the xyxy boxes they give around ``anchor_points`` (ultralytics ``bbox_decode`` +
    ``dist2bbox``); units of the anchor points."""
    reg_max = pred_dist.shape[-1] // 4
    proj = torch.arange(reg_max, dtype=pred_dist.dtype, device=pred_dist.device)
    dist = pred_dist.view(*pred_dist.shape[:-1], 4, reg_max).softmax(-1).matmul(proj)
    lt, rb = dist.chunk(2, -1)
    return torch.cat((anchor_points - lt, anchor_points + rb), -1)


def _finite_flag(feats: Sequence[Tensor]) -> Tensor:
    """bool 0-dim: whether ``feats`` may hold NaN or inf (a sum per level, non-finite when an
    element is, or when it overflows, which :func:`_check_finite` then clears); no synchronization."""
    sums = torch.stack([f.detach().sum(dtype=torch.float64 if f.dtype == torch.float64 else torch.float32) for f in feats])
    return ~torch.isfinite(sums).all()


def _check_finite(feats: Sequence[Tensor], exact: bool = False) -> None:
    """NaN or inf anywhere in ``feats`` raises, naming the level and the first position; one host
    synchronization for all levels (``exact``: the element-wise check alone)."""
    if not exact and not bool(_finite_flag(feats)):
        return
    for i, f in enumerate(feats):
        bad = ~torch.isfinite(f.detach())
        if bool(bad.any()):
            raise ValueError(f"feats[{i}]: expected finite values, got NaN or inf at {tuple(int(j) for j in bad.nonzero()[0])}")


def _sparse_targets(assignment: Assignment) -> Optional[Tuple[Tensor, Tensor]]:
    return assignment.sparse_target_scores() if isinstance(assignment, TALAssignment) else None


def _onehot_bce(logits: Tensor, labels: Tensor, scores: Tensor, class_weights: Optional[Tensor]) -> Tensor:
    """Summed BCE of ``logits [B, A, nc]`` against the one-hot soft targets ``(labels, scores)``
    ``[B, A]`` (:mod:`detloss.kernels.onehot`), run over the logits' memory order: ``[B, nc, A]``
    when the logits are a view of that (a head's concatenated class maps), else ``[B, A, nc]``."""
    dt, dev, nc = logits.dtype, logits.device, logits.shape[-1]
    chan = torch.arange(nc, dtype=dt, device=dev)
    weight = torch.ones(nc, dtype=dt, device=dev) if class_weights is None else class_weights.to(dt)
    labels, scores = labels.to(dt), scores.to(dt)
    if logits.transpose(1, 2).is_contiguous():
        x, row, col = logits.transpose(1, 2), (slice(None), None, slice(None)), (None, slice(None), None)
    else:
        x, row, col = logits, (slice(None), slice(None), None), (None, None, slice(None))
    return kernels.fused_onehot_bce_with_logits(x, labels[row], scores[row], chan[col], weight[col])


def _padded_targets(
    targets: Tensor, batch_size: int, image_hw: Tuple[float, float], dtype: torch.dtype, most: Optional[int] = None
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`preprocess_targets` plus ``rows [B, M]``: the row of ``targets`` in each slot (-1
    in padding slots). ``most``: ``M`` if known (see :func:`~detloss.boxes.image_slots`)."""
    dev = targets.device
    img = targets[:, 0].long()
    slot, m = image_slots(img, batch_size, most)
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


class PaddingRuleWarning(UserWarning):
    """Target rows were dropped by ultralytics' padding rule (see :class:`YOLOv8Loss`)."""


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
    each ``[B, M, ...]``. ``head``: the per-level maps (:class:`~detloss.losses._head_maps.HeadMaps`)
    when the outputs came as maps; YOLOv8Loss's own steps then read the maps, and ``pred_dist`` /
    ``pred_logits`` are concatenated from them only if a step reads them (a
    :class:`~detloss._lazy.Deferred` until then).
    """

    levels: List[Level]
    batch_size: int
    dtype: torch.dtype
    device: torch.device
    image_hw: Tuple[float, float]
    pred_dist: Tensor = DeferredField()
    pred_logits: Tensor = DeferredField()
    targets: Tensor
    gt_labels: Tensor
    gt_bboxes: Tensor
    mask_gt: Tensor
    gt_rows: Tensor
    head: Optional[HeadMaps] = None


@dataclass
class YOLOv8Decoding:
    """Training-time decoding (:meth:`YOLOv8Loss.prepare`), then what :meth:`YOLOv8Loss.gather`
    adds: anchor points ``[A, 2]`` and strides ``[A, 1]``, predicted boxes ``[B, A, 4]`` (xyxy,
    grid units); per positive (the assignment's order) its anchor point, stride, predicted box,
    distribution logits ``[P, 4 * reg_max]`` and target box (grid units); the normalizer ``S``
    and the batch size ``total`` is multiplied by (the global one with ``reduce_across_ranks``).

    ``decode_positives``: ``pred_bboxes`` carry no gradient (they are what the assigner reads),
    and ``gather`` decodes the positives' boxes again, with gradient, from their distributions
    (:meth:`YOLOv8Loss.decode_boxes`); False (a variant's own ``prepare``): the positives' boxes
    are the rows of ``pred_bboxes``. ``cls_sum``: the class BCE summed over every anchor and class
    (before ``/ S``), when ``gather`` computed it in the same pass over the head maps as the
    positives' distributions (None: :meth:`YOLOv8Loss.cls_term` computes it). ``fused``: the head
    maps run the fused path (:func:`detloss.kernels.use_fused`), so the box term takes the compiled
    CIoU pass too. ``pos_ciou_loss``: the positives' ``1 - CIoU`` with its graph, kept by
    :meth:`YOLOv8Loss.positive_ciou_loss` (computed once per call by the box term; the stats read it,
    and compute a CIoU of their own, without a graph, when no box term ran)."""

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
    decode_positives: bool = False
    cls_sum: Optional[Tensor] = None
    fused: bool = False
    pos_ciou_loss: Optional[Tensor] = None


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
    (valid boxes), ``dropped_targets`` (rows the padding rule below dropped),
    ``matched_targets`` (boxes with at least one positive), ``normalizer`` and
    ``target_scores_sum`` (both the normalizer S), ``iou_mean`` (mean IoU of the positives'
    decoded boxes with their targets; 0.0 without positives), ``ciou_mean``.
    :meth:`assign` gives the :class:`~detloss.assign.tal.TALAssignment` used (``target_index``:
    the row of ``targets``); :meth:`decode` the inference boxes and scores.

    Padding rule: ultralytics pads the targets per image with zero rows and tells them from
    boxes by ``x1 + y1 + x2 + y2 > 0`` (pixels). This loss keeps that rule for exact parity, so a
    real box centred exactly at (0, 0) (the image's top-left corner; its pixels sum to 0) is
    dropped as padding there and here alike: it gets no anchor and is not counted in
    ``num_targets``. It is made visible: ``stats["dropped_targets"]`` counts such rows and the
    call warns (:class:`PaddingRuleWarning`) when there are any.

    The levels of ``feats`` must come from one image size (``H_l`` = ``ceil`` or ``floor`` of
    ``H / strides[l]`` at every level, the same for ``W``): sizes that match no image (8 x 8 at
    every stride, levels in the wrong order) are refused with a ValueError instead of giving a
    loss on misplaced anchors. A batch of 0 images gives a zero loss connected to ``feats``.

    Differences: float16/bfloat16 inputs are computed in float32 (gradients come back in the
    input dtype), under ``torch.autocast`` too: the box decoding (the softmax expectation, a
    matmul that autocast would run in bfloat16) runs with autocast off. The reference allocates its targets in torch's default dtype, so with float64
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
    def _check_feats(self, feats: Sequence[Tensor], finite: bool = True) -> List[Level]:
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
            levels.append((int(f.shape[2]), int(f.shape[3]), s))
        if finite:
            _check_finite(feats)
        check_level_sizes("feats", [(h, w) for h, w, _ in levels], self.strides)
        return levels

    def _split(self, feats: Sequence[Tensor], dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """``pred_dist [B, A, 4 * reg_max]`` (contiguous) and ``pred_logits [B, A, nc]`` (a view:
        no copy of the class logits) in ``dtype``."""
        bsz = feats[0].shape[0]
        pred = torch.cat([upcast(f, dtype).reshape(bsz, f.shape[1], f.shape[2] * f.shape[3]) for f in feats], 2)
        pred_dist, pred_logits = pred.split((4 * self.reg_max, self.num_classes), 1)
        return pred_dist.permute(0, 2, 1).contiguous(), pred_logits.permute(0, 2, 1)

    def check(self, feats: Sequence[Tensor], targets: Tensor) -> YOLOv8Inputs:
        """The checks of ``feats`` and ``targets`` and the targets' padding ``M`` read in one host
        synchronization; on a failure the exact checks run again and raise."""
        levels = self._check_feats(feats, finite=False)
        bsz = feats[0].shape[0]
        dt = compute_dtype(*feats)
        dev = feats[0].device
        rows = yolo_target_rows(targets).to(dev)
        img = rows[:, 0].nan_to_num(0.0).clamp(0, max(bsz - 1, 0)).long()  # in range; bad rows fail the flags
        counts = image_counts(img, bsz) if bsz else img.new_zeros(1)
        flags = torch.cat((_finite_flag(feats)[None], yolo_target_flags(rows, self.num_classes, bsz)))
        read = torch.cat((flags.any()[None].long(), counts.max()[None])).tolist()
        if read[0]:
            _check_finite(feats, exact=True)
            check_yolo_targets(targets, num_classes=self.num_classes, batch_size=bsz)
        head = HeadMaps([upcast(f, dt).reshape(bsz, f.shape[1], f.shape[2] * f.shape[3]) for f in feats], self.reg_max, self.num_classes)
        image_hw = (levels[0][0] * self.strides[0], levels[0][1] * self.strides[0])
        gt_labels, gt_bboxes, mask_gt, gt_rows = _padded_targets(rows, bsz, image_hw, dt, most=read[1] if rows.shape[0] else 0)
        return YOLOv8Inputs(levels, bsz, dt, dev, image_hw, Deferred(head.concat_box_channels), Deferred(head.concat_logits),
                            targets, gt_labels, gt_bboxes, mask_gt, gt_rows, head=head)

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
        """Anchor points and the decoded boxes of every anchor, without gradient (the assigner's
        input; :meth:`gather` decodes the positives' boxes again with gradient), level by level
        from the head maps when there are maps."""
        anchor_points, stride_tensor = make_anchors(inputs.levels, inputs.dtype, inputs.device)
        head = inputs.head
        with torch.no_grad():
            if head is not None:
                pred_bboxes = self._decode_maps(head, anchor_points)
            else:
                pred_bboxes = self._decode_anchor_major(inputs.pred_dist, anchor_points)
        return YOLOv8Decoding(anchor_points, stride_tensor, pred_bboxes, decode_positives=True)

    def _decode_anchor_major(self, pred_dist: Tensor, anchor_points: Tensor) -> Tensor:
        """:meth:`decode_boxes` of ``pred_dist [B, A, 4 * reg_max]``; when that is a transposed view
        of a head's ``[B, 4 * reg_max, A]`` output (ultralytics 8.4's heads) and the fused path is on,
        one compiled loop over that layout (:func:`detloss.kernels.decode_head_maps`, the same
        expectation to a few ulps) instead of a softmax over strided rows."""
        channels = pred_dist.transpose(1, 2)
        if channels.is_contiguous() and self._compiled_decode([channels]):
            return kernels.decode_head_maps([channels], [anchor_points], self.reg_max)
        return self.decode_boxes(pred_dist, anchor_points)

    def _compiled_decode(self, maps: Sequence[Tensor]) -> bool:
        """Whether :meth:`decode_boxes` of these ``[B, C, n]`` maps may run as
        :func:`detloss.kernels.decode_head_maps`: distributions (``reg_max > 1``), this class's own
        decoding (not overridden) and the compiled path on for them."""
        return (self.reg_max > 1 and type(self).decode_boxes is YOLOv8Loss.decode_boxes
                and kernels.use_compiled_decode(maps))

    def _decode_maps(self, head: HeadMaps, anchor_points: Tensor) -> Tensor:
        """:meth:`decode_boxes` of every anchor of the head maps ``[B, A, 4]``, level by level
        and in blocks of about :data:`DECODE_BLOCK_ROWS` rows (image x anchor), each written into
        one output: the same values (the decoding is row by row), with temporaries (the softmax
        and its contiguous input) of a block instead of a whole level. On the fused path
        (compiling on, maps of at least :func:`~detloss.kernels.min_numel` elements) the
        distributions' expectations come from :func:`detloss.kernels.decode_head_maps` instead."""
        if self._compiled_decode(head.maps):
            # one compiled loop over the maps' own layout (the same expectation, to a few ulps)
            return kernels.decode_head_maps(head.maps, anchor_points.split(head.sizes), self.reg_max)
        m0 = head.maps[0]
        out = torch.empty((head.batch_size, head.num_anchors, 4), dtype=m0.dtype, device=m0.device)
        step = max(DECODE_BLOCK_ROWS // max(head.batch_size, 1), 1)
        for i, (off, n) in enumerate(zip(head.offsets, head.sizes)):
            channels = head.box_channels(i)
            for s in range(0, n, step):
                e = min(s + step, n)
                out[:, off + s : off + e] = self.decode_boxes(channels[:, s:e], anchor_points[off + s : off + e])
        return out

    def assignment(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding) -> Assignment:
        """The task-aligned assignment (``self.assigner``) on the detached predictions, in pixels;
        ``target_index`` becomes the row of ``targets``."""
        with torch.no_grad():
            stride = prepared.stride_tensor
            # TaskAlignedAssigner reads the head maps where it needs them; another assigner gets the tensor
            own = isinstance(self.assigner, TaskAlignedAssigner) and type(self.assigner).assign is TaskAlignedAssigner.assign
            if inputs.head is not None:
                scores = inputs.head if own else inputs.head.scores()
            else:
                scores = inputs.pred_logits.detach().sigmoid()
            asg = self.assigner.assign(
                scores,
                prepared.pred_bboxes.detach() * stride,
                prepared.anchor_points * stride,
                inputs.gt_labels,
                inputs.gt_bboxes,
                inputs.mask_gt,
                inputs.levels,
            )
            return replace(asg, target_index=inputs.gt_rows[asg.batch_index, asg.target_index])

    def gather(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment) -> YOLOv8Decoding:
        """The positives' rows and the normalizer. With head maps on the fused path
        (:func:`detloss.kernels.use_fused`), one pass over the maps gives the positives'
        distribution logits and, for this class's :meth:`cls_term` and one-hot targets, the class
        BCE sum (``cls_sum``), with the head's whole gradient in one buffer
        (:func:`~detloss.losses._head_maps.head_terms`)."""
        b, a = assignment.batch_index, assignment.pred_index
        pos_strides = prepared.stride_tensor[a]
        pos_anchor_points = prepared.anchor_points[a]
        sparse = _sparse_targets(assignment)
        score_sum = sparse[1].sum() if sparse is not None else assignment.extras["target_scores"].sum()
        if self.reduce_across_ranks:
            # one all-reduce for both: the mean target-score sum and the global batch size
            local = torch.stack((score_sum.detach(), score_sum.new_tensor(float(inputs.batch_size))))
            score_sum, mean_batch = self.global_mean(local).unbind(0)
            batch_factor: Union[int, Tensor] = mean_batch * self.world_size()
        else:
            batch_factor = inputs.batch_size
        cls_sum = None
        fused = inputs.head is not None and kernels.use_fused(inputs.head.maps[0])
        if fused:
            fuse_cls = sparse is not None and type(self).cls_term is YOLOv8Loss.cls_term
            pos_pred_dist, cls_sum = head_terms(inputs.head, b, a, sparse if fuse_cls else None, self.class_weights)
        else:
            pos_pred_dist = gather_rows(inputs.pred_dist, b, a)
        if prepared.decode_positives:
            pos_pred_bboxes = self.decode_boxes(pos_pred_dist, pos_anchor_points)
        else:
            pos_pred_bboxes = prepared.pred_bboxes[b, a]
        return replace(
            prepared,
            pos_anchor_points=pos_anchor_points,
            pos_strides=pos_strides,
            pos_pred_bboxes=pos_pred_bboxes,
            pos_pred_dist=pos_pred_dist,
            pos_target_bboxes=assignment.boxes / pos_strides,
            normalizer=score_sum.clamp(min=1),
            batch_factor=batch_factor,
            cls_sum=cls_sum,
            fused=fused,
        )

    # ------------------------------------------------------------------ the terms
    def cls_term(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """BCE of every class logit against the soft target scores, over S (``cls_sum`` when
        :meth:`gather` computed it; one-hot targets go through the fused one-hot pass without
        building ``[B, A, nc]`` targets)."""
        if prepared.cls_sum is not None:
            return prepared.cls_sum / prepared.normalizer
        logits = inputs.pred_logits
        cw = None if self.class_weights is None else self.class_weights.to(logits)
        sparse = _sparse_targets(assignment)
        if sparse is not None and kernels.use_fused(logits):
            return _onehot_bce(logits, *sparse, cw) / prepared.normalizer
        target_scores = assignment.extras["target_scores"]
        return F.bce_with_logits(logits, target_scores, weight=cw, reduction="sum") / prepared.normalizer

    def positive_ciou_loss(self, prepared: YOLOv8Decoding) -> Tensor:
        """``1 - CIoU`` of each positive's decoded box with its target (grid units), with its graph;
        computed on the first use in a call and kept in ``prepared``. On the fused path it and its
        gradient come from the compiled pass (:func:`detloss.kernels.fused_iou_loss`: one call at any
        number of positives, the gradient in closed form), else from the formula through autograd;
        the same values to rounding."""
        if prepared.pos_ciou_loss is None:
            pred, target = prepared.pos_pred_bboxes, prepared.pos_target_bboxes
            if prepared.fused and pred.requires_grad and not target.requires_grad:
                loss = kernels.fused_iou_loss(pred, target, "ciou", convention="yolov5", reduction="none", compiled=True)
            else:
                loss = 1.0 - F.aligned_box_iou(pred, target, kind="ciou", convention="yolov5", validate=False)
            prepared.pos_ciou_loss = loss
        return prepared.pos_ciou_loss

    def box_term(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """``sum w_a (1 - CIoU)`` over the positives (:meth:`positive_ciou_loss`), over S."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        return (self.positive_ciou_loss(prepared) * assignment.weights).sum() / prepared.normalizer

    def dfl_term(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """``sum w_a mean_sides DFL`` over the positives, over S (targets clamped to ``reg_max - 1.01``)."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        reg_max = self.reg_max
        anchor, target = prepared.pos_anchor_points, prepared.pos_target_bboxes
        ltrb = torch.cat((anchor - target[:, :2], target[:, 2:] - anchor), -1).clamp(0, reg_max - 1 - DFL_MARGIN)
        dfl = dfl_in_range(prepared.pos_pred_dist.reshape(-1, reg_max), ltrb.reshape(-1), "none")  # in range: clamped
        return (dfl.view(-1, 4).mean(-1) * assignment.weights).sum() / prepared.normalizer

    def output(self, inputs: YOLOv8Inputs, prepared: YOLOv8Decoding, assignment: Assignment, raw: Dict[str, Tensor]) -> LossOutput:
        """The base output, plus a :class:`PaddingRuleWarning` when ``stats["dropped_targets"]``
        (rows the padding rule took for padding; read with the other stats, no extra sync) is not 0."""
        out = super().output(inputs, prepared, assignment, raw)
        dropped = out.stats.get("dropped_targets", 0)
        if dropped:
            warnings.warn(
                f"targets: {dropped} row(s) centred at (0, 0) were dropped: ultralytics' padding rule "
                "(x1 + y1 + x2 + y2 > 0, kept for parity with v8DetectionLoss) takes them for padding; "
                "move such a centre off the image corner to keep the box",
                PaddingRuleWarning,
                stacklevel=2,
            )
        return out


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
            if prepared.pos_ciou_loss is not None:  # the box term's (grid units: the same CIoU up to its eps)
                ciou_mean = 1.0 - prepared.pos_ciou_loss.detach().mean()
            else:  # a variant without this box term: computed here, without a graph
                ciou_mean = F.aligned_box_iou(pred_px, assignment.boxes, kind="ciou", convention="yolov5", validate=False).mean()
        return {
            "num_pos": assignment.num_pos,
            "num_targets": inputs.mask_gt.sum(),
            "dropped_targets": n_rows - inputs.mask_gt.sum(),
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
        with autocast_off():
            boxes = self.decode_boxes(pred_dist, anchor_points) * stride_tensor
        return Decoded(boxes, pred_logits.sigmoid())

    def prior_outputs(self, image_size: Tuple[int, int], batch_size: int = 1) -> Tuple[List[Tensor]]:
        h, w = image_size
        no = 4 * self.reg_max + self.num_classes
        return ([torch.zeros(batch_size, no, math.ceil(h / s), math.ceil(w / s), dtype=torch.float64) for s in self.strides],)

    def prediction_levels(self, feats: Sequence[Tensor]) -> List[GridLevel]:
        """One anchor point per cell, at the cell centre."""
        return [GridLevel(s, (int(f.shape[2]), int(f.shape[3])), (s, s)) for f, s in zip(feats, self.strides)]
