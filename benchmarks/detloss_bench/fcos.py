"""FCOS loss benchmark: FCOSLoss forward + backward, time and peak memory, 10 vs 500 boxes.

Default sizes: batch 8 at 640 x 640 (P3-P7, 8525 points per image), 80 classes, 10 and 500
boxes per image. Baseline, run in the same process: torchvision's FCOS.compute_loss as
torchvision writes it, i.e. the dense points x boxes matcher per image followed by
FCOSHead.compute_loss (built from the same detloss.functional primitives), so the difference
is the assignment. Both are checked to agree before timing.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, List, Optional, Sequence

import torch

from detloss import functional as F
from detloss.assign.fcos import assign_fcos
from detloss.functional.iou import _iou_loss_formula  # unchecked: predictions may be inverted boxes
from detloss.losses.fcos import FCOSLoss
from ._common import fmt_mb, fmt_ms, median_time, peak_memory, print_growth, print_table

STRIDES = (8, 16, 32, 64, 128)


# ----------------------------------------------------------------------------- baseline
def _torchvision_anchors(feature_sizes, dtype) -> torch.Tensor:
    """AnchorGenerator's anchors: centres (x * stride, y * stride), side = stride."""
    out = []
    for (h, w), s in zip(feature_sizes, STRIDES):
        ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype) * s, torch.arange(w, dtype=dtype) * s, indexing="ij")
        xs, ys = xs.reshape(-1), ys.reshape(-1)
        out.append(torch.stack((xs - s / 2, ys - s / 2, xs + s / 2, ys + s / 2), dim=1))
    return torch.cat(out)


def torchvision_dense_match_image(anchors, num_anchors_per_level, gt_boxes, center_sampling_radius=1.5):
    """BASELINE: torchvision FCOS.compute_loss's matcher for one image, dense points x boxes."""
    if gt_boxes.numel() == 0:
        return torch.full((anchors.size(0),), -1, dtype=torch.int64)
    gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    anchor_sizes = anchors[:, 2] - anchors[:, 0]
    pairwise_match = (anchor_centers[:, None, :] - gt_centers[None, :, :]).abs_().max(
        dim=2
    ).values < center_sampling_radius * anchor_sizes[:, None]
    x, y = anchor_centers.unsqueeze(dim=2).unbind(dim=1)
    x0, y0, x1, y1 = gt_boxes.unsqueeze(dim=0).unbind(dim=2)
    pairwise_dist = torch.stack([x - x0, y - y0, x1 - x, y1 - y], dim=2)
    pairwise_match &= pairwise_dist.min(dim=2).values > 0
    lower_bound = anchor_sizes * 4
    lower_bound[: num_anchors_per_level[0]] = 0
    upper_bound = anchor_sizes * 8
    upper_bound[-num_anchors_per_level[-1]:] = float("inf")
    pairwise_dist = pairwise_dist.max(dim=2).values
    pairwise_match &= (pairwise_dist > lower_bound[:, None]) & (pairwise_dist < upper_bound[:, None])
    gt_areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    pairwise_match = pairwise_match.to(torch.float32) * (1e8 - gt_areas[None, :])
    min_values, matched_idx = pairwise_match.max(dim=1)
    matched_idx[min_values < 1e-5] = -1
    return matched_idx


def torchvision_dense_match(anchors, num_anchors_per_level, targets, center_sampling_radius=1.5):
    """BASELINE: torchvision FCOS.compute_loss's matcher, dense points x boxes, per image."""
    return [
        torchvision_dense_match_image(anchors, num_anchors_per_level, t["boxes"], center_sampling_radius)
        for t in targets
    ]


def torchvision_dense_loss(cls_logits, bbox_regression, bbox_ctrness, anchors, num_anchors_per_level, targets):
    """BASELINE: dense matcher + FCOSHead.compute_loss as torchvision writes it."""
    matched_idxs = torchvision_dense_match(anchors, num_anchors_per_level, targets)
    all_cls, all_boxes = [], []
    for t, m in zip(targets, matched_idxs):
        if len(t["labels"]) == 0:
            cls_t = t["labels"].new_zeros((len(m),))
            box_t = t["boxes"].new_zeros((len(m), 4))
        else:
            cls_t = t["labels"][m.clip(min=0)]
            box_t = t["boxes"][m.clip(min=0)]
        cls_t[m < 0] = -1
        all_cls.append(cls_t)
        all_boxes.append(box_t)
    gt_boxes, gt_classes = torch.stack(all_boxes), torch.stack(all_cls)
    anchors_b = anchors.unsqueeze(0).expand(len(targets), -1, -1)
    fg = gt_classes >= 0
    num_fg = int(fg.sum())
    onehot = torch.zeros_like(cls_logits)
    onehot[fg, gt_classes[fg]] = 1.0
    loss_cls = F.sigmoid_focal_loss(cls_logits, onehot, reduction="sum")
    ctr = (anchors_b[..., :2] + anchors_b[..., 2:]) / 2
    size = (anchors_b[..., 2] - anchors_b[..., 0])[..., None]
    d = bbox_regression * size
    pred_boxes = torch.cat((ctr - d[..., :2], ctr + d[..., 2:]), dim=-1)
    loss_box = _iou_loss_formula(pred_boxes[fg], gt_boxes[fg], kind="giou", reduction="sum")
    enc = torch.cat((ctr - gt_boxes[..., :2], gt_boxes[..., 2:] - ctr), dim=-1) / size
    lr, tb = enc[..., [0, 2]], enc[..., [1, 3]]
    ctr_t = torch.sqrt(lr.min(-1).values / lr.max(-1).values * (tb.min(-1).values / tb.max(-1).values))
    loss_ctr = F.bce_with_logits(bbox_ctrness.squeeze(2)[fg], ctr_t[fg], reduction="sum")
    n = max(1, num_fg)
    return loss_cls / n + loss_box / n + loss_ctr / n


# ----------------------------------------------------------------------------- data
def make_inputs(batch, size, num_classes, boxes_per_image, seed=0):
    g = torch.Generator().manual_seed(seed)
    feature_sizes = [(math.ceil(size / s), math.ceil(size / s)) for s in STRIDES]
    p = sum(h * w for h, w in feature_sizes)
    heads = [
        torch.randn(batch, p, num_classes, generator=g),
        torch.rand(batch, p, 4, generator=g) * 4,
        torch.randn(batch, p, 1, generator=g),
    ]
    targets = []
    for _ in range(batch):
        wh = torch.exp(torch.rand(boxes_per_image, 2, generator=g) * math.log(size / 2 / 6)) * 6
        xy = torch.rand(boxes_per_image, 2, generator=g) * (size - wh)
        targets.append(
            {"boxes": torch.cat((xy, xy + wh), dim=1), "labels": torch.randint(0, num_classes, (boxes_per_image,), generator=g)}
        )
    return feature_sizes, heads, targets


def _fwd_bwd(loss_fn):
    def run():
        loss = loss_fn()
        loss.backward()
    return run


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="detloss bench fcos", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=640, help="square image side in pixels")
    ap.add_argument("--classes", type=int, default=80)
    ap.add_argument("--boxes", type=int, nargs="+", default=[10, 500], help="boxes per image")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.batch, args.size, args.classes, args.boxes, args.repeats = 2, 128, 4, [3, 20], 1

    rows: List[List[object]] = []
    results: Dict[str, Dict[int, tuple]] = {"FCOSLoss": {}, "torchvision dense (baseline)": {}}
    loss_fn = FCOSLoss(args.classes)
    for nb in args.boxes:
        feature_sizes, heads, targets = make_inputs(args.batch, args.size, args.classes, nb)
        anchors = _torchvision_anchors(feature_sizes, torch.float32)
        counts = [h * w for h, w in feature_sizes]
        leaves = [h.clone().requires_grad_() for h in heads]

        def ours():
            return loss_fn(*leaves, feature_sizes, targets).total

        def base():
            return torchvision_dense_loss(*leaves, anchors, counts, targets)

        a, b = ours().item(), base().item()
        if not math.isclose(a, b, rel_tol=1e-4):
            raise RuntimeError(f"FCOSLoss {a} and the torchvision baseline {b} disagree")
        num_pos = int(assign_fcos(targets, feature_sizes, STRIDES).foreground.sum())
        for label, fn, assign in (
            ("FCOSLoss", ours, lambda: assign_fcos(targets, feature_sizes, STRIDES)),
            ("torchvision dense (baseline)", base, lambda: torchvision_dense_match(anchors, counts, targets)),
        ):
            t = median_time(_fwd_bwd(fn), repeats=args.repeats, warmup=1)
            m = peak_memory(_fwd_bwd(fn))
            ta = median_time(assign, repeats=args.repeats, warmup=1)
            ma = peak_memory(assign)
            results[label][nb] = (t, m, ta, ma)
        for label in results:
            t, m, ta, ma = results[label][nb]
            bt, bm, bta, bma = results["torchvision dense (baseline)"][nb]
            rows.append([nb, num_pos, label, fmt_ms(t), fmt_mb(m), f"{t / bt:.2f}x", f"{m / bm:.2f}x",
                         fmt_ms(ta), fmt_mb(ma)])
    p = sum(h * w for h, w in feature_sizes)
    print(f"\nFCOS loss forward + backward: batch {args.batch}, {args.size}x{args.size} "
          f"({p} points/image), {args.classes} classes, float32, {torch.get_num_threads()} threads")
    print_table(
        ["boxes/img", "positives", "method", "fwd+bwd", "peak mem", "time/base", "mem/base", "assign", "assign mem"],
        rows,
    )
    print_growth(results, min(args.boxes), max(args.boxes), width=30)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
