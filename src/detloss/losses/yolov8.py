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
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from .. import distributed
from .. import functional as F
from .._checks import check_floating, check_tensor, compute_dtype, upcast
from ..assign.tal import Level, TaskAlignedAssigner
from ..boxes import check_yolo_targets
from ..output import LossOutput

__all__ = ["YOLOv8Loss", "make_anchors", "decode_distances", "preprocess_targets"]

#: DFL targets are clamped to ``reg_max - 1 - DFL_MARGIN`` (ultralytics ``bbox2dist`` / ``DFLoss``).
DFL_MARGIN = 0.01


def make_anchors(levels: Sequence[Level], dtype: torch.dtype, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Anchor points ``[A, 2]`` in grid units ``(x + 0.5, y + 0.5)`` and their strides ``[A, 1]``,
    level by level, row-major (ultralytics ``make_anchors`` with offset 0.5)."""
    points, strides = [], []
    for h, w, s in levels:
        sx = torch.arange(w, dtype=dtype, device=device) + 0.5
        sy = torch.arange(h, dtype=dtype, device=device) + 0.5
        gy, gx = torch.meshgrid(sy, sx, indexing="ij")
        points.append(torch.stack((gx, gy), -1).reshape(-1, 2))
        strides.append(torch.full((h * w, 1), float(s), dtype=dtype, device=device))
    return torch.cat(points), torch.cat(strides)


def decode_distances(pred_dist: torch.Tensor, anchor_points: torch.Tensor) -> torch.Tensor:
    """Expected ltrb distances of the box-side distributions ``[..., A, 4 * reg_max]`` (side
    major) and the xyxy boxes they give around ``anchor_points`` (ultralytics ``bbox_decode`` +
    ``dist2bbox``); units of the anchor points."""
    reg_max = pred_dist.shape[-1] // 4
    proj = torch.arange(reg_max, dtype=pred_dist.dtype, device=pred_dist.device)
    dist = pred_dist.view(*pred_dist.shape[:-1], 4, reg_max).softmax(-1).matmul(proj)
    lt, rb = dist.chunk(2, -1)
    return torch.cat((anchor_points - lt, anchor_points + rb), -1)


def preprocess_targets(
    targets: torch.Tensor, batch_size: int, image_hw: Tuple[float, float], dtype: torch.dtype
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """YOLO rows -> per-image padded ``gt_labels [B, M]`` (int64), ``gt_bboxes [B, M, 4]`` (xyxy
    pixels) and ``mask_gt [B, M]``; ``M`` = most targets in one image. Rows keep their order
    within an image (the order ``target_gt_idx`` refers to); they need not be sorted by image.
    A row is valid when ``x1 + y1 + x2 + y2 > 0`` (ultralytics' rule for padding)."""
    dev = targets.device
    img = targets[:, 0].long()
    counts = torch.bincount(img, minlength=batch_size)
    m = int(counts.max()) if targets.shape[0] else 0
    order = torch.sort(img, stable=True).indices
    slot = torch.empty_like(img)
    slot[order] = torch.arange(img.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[img[order]]
    h, w = image_hw
    xywh = targets[:, 2:6].to(dtype) * torch.tensor([w, h, w, h], dtype=dtype, device=dev)
    half = xywh[:, 2:] / 2
    xyxy = torch.cat((xywh[:, :2] - half, xywh[:, :2] + half), -1)
    labels = torch.zeros((batch_size, m), dtype=torch.long, device=dev)
    boxes = torch.zeros((batch_size, m, 4), dtype=dtype, device=dev)
    labels[img, slot] = targets[:, 1].long()
    boxes[img, slot] = xyxy
    return labels, boxes, boxes.sum(-1) > 0


class YOLOv8Loss(torch.nn.Module):
    """YOLOv8 / YOLO11 detection loss, equal to ultralytics 8.4 ``v8DetectionLoss``.

    Formula and source in the module docstring. Args (defaults = ultralytics' hyperparameters):

        num_classes: ``nc``; each level's head output has ``4 * reg_max + nc`` channels.
        strides: stride of each level in pixels; the image size is level 0's ``H, W`` times
            ``strides[0]``.
        reg_max: bins of each box-side distribution (16).
        box, cls, dfl: gains of the three terms (7.5, 0.5, 1.5).
        tal_topk: anchors kept per box by the assigner (10).
        tal_topk2: optional second cut after resolving shared anchors (None; YOLO26 one-to-one: 1).
        tal_alpha, tal_beta: exponents of the alignment metric (0.5, 6.0).
        enlarge_small_boxes: widen box sides shorter than ``strides[1]`` to it for the assigner's
            inside test (ultralytics 8.4, default); False gives ultralytics 8.3's assignment.
        dense_assigner: run the assigner the reference's dense ``[B, M, A]`` way (same results,
            more memory; a baseline for tests and benchmarks).
        reduce_across_ranks: normalize by the batch-wide target-score sum of *all* ranks. Off
            (default, as ultralytics): each rank divides by its own sum, so under
            DistributedDataParallel the averaged gradient weighs ranks by the inverse of their
            own sums. On: every rank divides by ``max(sum over ranks / world_size, 1)``, so DDP's
            average of the gradients equals the gradient of the whole global batch computed on one
            process (the ``max(., 1)`` floor then applies to that mean). A no-op without
            ``torch.distributed`` initialized.

    Call ``loss_fn(feats, targets)``: ``feats`` a list of per-level head outputs
    ``[B, 4 * reg_max + nc, H_l, W_l]`` (stride ``strides[0]`` first; channel ``k * reg_max + j``
    is bin ``j`` of side ``k`` in the order left, top, right, bottom; then the class logits),
    ``targets`` rows ``[N, 6]`` ``(image_index, class, cx, cy, w, h)`` normalized to 0..1.
    Returns a :class:`~detloss.LossOutput`: ``total`` = the sum of what v8DetectionLoss returns
    first (``(box + cls + dfl) * B`` after the gains); ``components`` "box", "cls", "dfl" = its
    detached items (after the gains, before ``* B``); ``stats``: ``num_pos`` (positive anchors),
    ``num_targets`` (valid boxes), ``matched_targets`` (boxes with at least one positive),
    ``target_scores_sum`` (the normalizer S), ``iou_mean`` (mean IoU of the positives' decoded
    boxes with their targets; 0.0 without positives), ``ciou_mean``.

    Differences: float16/bfloat16 inputs are computed in float32 (gradients come back in the
    input dtype). The reference allocates its targets in torch's default dtype, so with float64
    inputs and a float32 default it rounds to float32; here float64 inputs are computed in
    float64. Zero-alignment anchors never become positives (see
    :mod:`detloss.assign.tal`); the loss is the same.
    """

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
        reduce_across_ranks: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(reg_max, int) or isinstance(reg_max, bool) or reg_max < 2:
            raise ValueError(f"reg_max: expected an int >= 2 (the DFL head), got {reg_max!r}")
        strides = tuple(float(s) for s in strides)
        if not strides:
            raise ValueError("strides: expected at least one level, got ()")
        self.num_classes = num_classes
        self.strides = strides
        self.reg_max = reg_max
        self.gains = {"box": float(box), "cls": float(cls), "dfl": float(dfl)}
        self.reduce_across_ranks = bool(reduce_across_ranks)
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
            f"gains={self.gains}, assigner={self.assigner!r}"
        )

    # ------------------------------------------------------------------ checks
    def _check_feats(self, feats: Sequence[torch.Tensor]) -> List[Level]:
        if isinstance(feats, torch.Tensor) or not isinstance(feats, (list, tuple)):
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

    # ------------------------------------------------------------------ the loss
    def forward(self, feats: Sequence[torch.Tensor], targets: torch.Tensor) -> LossOutput:
        levels = self._check_feats(feats)
        bsz = feats[0].shape[0]
        targets = check_yolo_targets(targets, num_classes=self.num_classes, batch_size=bsz)
        dt = compute_dtype(*feats)
        dev = feats[0].device
        nc, reg_max = self.num_classes, self.reg_max

        pred = torch.cat([upcast(f, dt).reshape(bsz, f.shape[1], -1) for f in feats], 2)
        pred_dist, pred_logits = pred.split((4 * reg_max, nc), 1)
        pred_dist = pred_dist.permute(0, 2, 1).contiguous()  # [B, A, 4 * reg_max]
        pred_logits = pred_logits.permute(0, 2, 1)  # [B, A, nc], a view: no copy of the class logits
        del pred
        anchor_points, stride_tensor = make_anchors(levels, dt, dev)
        pred_bboxes = decode_distances(pred_dist, anchor_points)  # xyxy, grid units

        image_hw = (levels[0][0] * self.strides[0], levels[0][1] * self.strides[0])
        gt_labels, gt_bboxes, mask_gt = preprocess_targets(targets.to(dev), bsz, image_hw, dt)
        with torch.no_grad():
            asg = self.assigner.assign(
                pred_logits.detach().sigmoid(),
                pred_bboxes.detach() * stride_tensor,
                anchor_points * stride_tensor,
                gt_labels,
                gt_bboxes,
                mask_gt,
                levels,
            )
        target_scores, fg = asg.target_scores, asg.fg_mask

        score_sum = target_scores.sum()
        if self.reduce_across_ranks:
            score_sum = distributed.reduce_sum(score_sum) / distributed.world_size()
        norm = score_sum.clamp(min=1)

        loss_cls = F.bce_with_logits(pred_logits, target_scores, reduction="sum") / norm
        weight = target_scores.sum(-1)[fg]
        num_pos = int(weight.numel())
        if num_pos:
            pos_stride = stride_tensor.expand(bsz, -1, -1)[fg]
            target_boxes = asg.target_bboxes[fg] / pos_stride
            pos_pred = pred_bboxes[fg]
            ciou = F.aligned_box_iou(pos_pred, target_boxes, kind="ciou", convention="yolov5")
            loss_box = ((1.0 - ciou) * weight).sum() / norm
            pos_anchor = anchor_points.expand(bsz, -1, -1)[fg]
            ltrb = torch.cat((pos_anchor - target_boxes[:, :2], target_boxes[:, 2:] - pos_anchor), -1)
            ltrb = ltrb.clamp(0, reg_max - 1 - DFL_MARGIN)
            dfl = F.distribution_focal_loss(pred_dist[fg].view(-1, reg_max), ltrb.reshape(-1), reduction="none")
            loss_dfl = (dfl.view(-1, 4).mean(-1) * weight).sum() / norm
        else:
            loss_box = loss_dfl = torch.zeros((), dtype=dt, device=dev)

        items = torch.stack(
            (loss_box * self.gains["box"], loss_cls * self.gains["cls"], loss_dfl * self.gains["dfl"])
        )
        total = items.sum() * bsz
        stats = self._stats(asg, mask_gt, pred_bboxes, stride_tensor, norm, num_pos)
        components = {k: v for k, v in zip(("box", "cls", "dfl"), items.detach())}
        return LossOutput(total=total, components=components, stats=stats)

    @torch.no_grad()
    def _stats(self, asg, mask_gt, pred_bboxes, stride_tensor, norm, num_pos) -> dict:
        fg = asg.fg_mask
        bsz = fg.shape[0]
        m = mask_gt.shape[1]
        matched = 0
        iou_mean = ciou_mean = 0.0
        if num_pos:
            img = torch.arange(bsz, device=fg.device)[:, None].expand_as(fg)[fg]
            matched = int(torch.unique(img * max(m, 1) + asg.target_gt_idx[fg]).numel())
            pred_px = pred_bboxes.detach()[fg] * stride_tensor.expand(bsz, -1, -1)[fg]
            tgt = asg.target_bboxes[fg]
            iou_mean = float(F.aligned_box_iou(pred_px, tgt, kind="iou", convention="yolov5").mean())
            ciou_mean = float(F.aligned_box_iou(pred_px, tgt, kind="ciou", convention="yolov5").mean())
        return {
            "num_pos": num_pos,
            "num_targets": int(mask_gt.sum()),
            "matched_targets": matched,
            "target_scores_sum": float(norm),
            "iou_mean": iou_mean,
            "ciou_mean": ciou_mean,
        }
