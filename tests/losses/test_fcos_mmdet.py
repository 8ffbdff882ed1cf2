"""FCOSLoss(convention="mmdet") against a transcription of mmdetection 3.x FCOSHead.loss_by_feat.

No reference data from mmdetection is stored; the functions below transcribe, line by line,
mmdet's ``FCOSHead.loss_by_feat`` / ``centerness_target``, mmdet's ``py_sigmoid_focal_loss``,
``bbox_overlaps`` (aligned, eps 1e-6), ``GIoULoss`` / ``IoULoss`` (mode "log") and
``weight_reduce_loss`` (``sum / (avg_factor + float32 eps)``); the matcher
``_get_targets_single`` is transcribed in test_fcos_assign.py. FCOSLoss keeps torchvision's
``eps`` placement inside the IoU formulas, so agreement is asserted to 1e-6 relative. The
torchvision convention is pinned by stored reference data (tests/data/torchvision_fcos/,
SOURCE: "torchvision 0.29.1+cu130 ... FCOS.compute_loss (matcher) -> FCOSHead.compute_loss.
Run unmodified on CPU in float64.") in test_fcos.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

from detloss.losses.fcos import FCOSLoss

from test_fcos_assign import STRIDES, _feature_sizes, mmdet_dense_targets, mmdet_points

EPS32 = torch.finfo(torch.float32).eps


def mmdet_bbox_overlaps_aligned(b1, b2, mode, eps=1e-6):
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    lt = torch.max(b1[..., :2], b2[..., :2])
    rb = torch.min(b1[..., 2:], b2[..., 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[..., 0] * wh[..., 1]
    union = area1 + area2 - overlap
    enclosed_lt = torch.min(b1[..., :2], b2[..., :2])
    enclosed_rb = torch.max(b1[..., 2:], b2[..., 2:])
    eps_t = union.new_tensor([eps])
    union = torch.max(union, eps_t)
    ious = overlap / union
    if mode == "iou":
        return ious
    enclose_wh = (enclosed_rb - enclosed_lt).clamp(min=0)
    enclose_area = torch.max(enclose_wh[..., 0] * enclose_wh[..., 1], eps_t)
    return ious - (enclose_area - union) / enclose_area


def mmdet_box_loss(pred, target, kind):
    if kind == "giou":
        return 1 - mmdet_bbox_overlaps_aligned(pred, target, "giou", eps=1e-6)
    ious = mmdet_bbox_overlaps_aligned(pred, target, "iou", eps=1e-6).clamp(min=1e-6)
    return -ious.log()


def mmdet_focal(pred, target, gamma=2.0, alpha=0.25):
    pred_sigmoid = pred.sigmoid()
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    focal_weight = (alpha * target + (1 - alpha) * (1 - target)) * pt.pow(gamma)
    return TF.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight


def mmdet_centerness_target(pos_bbox_targets):
    left_right = pos_bbox_targets[:, [0, 2]]
    top_bottom = pos_bbox_targets[:, [1, 3]]
    if len(left_right) == 0:
        centerness_targets = left_right[..., 0]
    else:
        centerness_targets = (left_right.min(dim=-1)[0] / left_right.max(dim=-1)[0]) * (
            top_bottom.min(dim=-1)[0] / top_bottom.max(dim=-1)[0]
        )
    return torch.sqrt(centerness_targets)


def mmdet_loss(cls, reg, ctr, fs, boxes_list, labels_list, num_classes, center_sampling, norm_on_bbox, kind):
    """FCOSHead.loss_by_feat on flattened [B, P, ...] outputs (one process)."""
    points, strides = mmdet_points(fs)
    all_labels, all_targets = [], []
    for boxes, labels in zip(boxes_list, labels_list):
        lab, tgt, _ = mmdet_dense_targets(points, fs, boxes, labels, num_classes, center_sampling)
        if norm_on_bbox:
            tgt = tgt / strides[:, None]
        all_labels.append(lab)
        all_targets.append(tgt)
    flatten_labels = torch.cat(all_labels)
    flatten_bbox_targets = torch.cat(all_targets)
    flatten_points = points.repeat(len(boxes_list), 1)
    flatten_cls_scores = cls.reshape(-1, num_classes)
    flatten_bbox_preds = reg.reshape(-1, 4)
    flatten_centerness = ctr.reshape(-1)
    bg_class_ind = num_classes
    pos_inds = ((flatten_labels >= 0) & (flatten_labels < bg_class_ind)).nonzero().reshape(-1)
    num_pos = max(float(len(pos_inds)), 1.0)
    onehot = TF.one_hot(flatten_labels, num_classes + 1)[:, :num_classes].to(cls.dtype)
    loss_cls = mmdet_focal(flatten_cls_scores, onehot).sum() / (num_pos + EPS32)
    pos_bbox_preds = flatten_bbox_preds[pos_inds]
    pos_centerness = flatten_centerness[pos_inds]
    pos_bbox_targets = flatten_bbox_targets[pos_inds]
    pos_centerness_targets = mmdet_centerness_target(pos_bbox_targets)
    centerness_denorm = max(float(pos_centerness_targets.sum().detach()), 1e-6)
    if len(pos_inds) > 0:
        pos_points = flatten_points[pos_inds]
        dec_pred = torch.cat((pos_points - pos_bbox_preds[:, :2], pos_points + pos_bbox_preds[:, 2:]), -1)
        dec_tgt = torch.cat((pos_points - pos_bbox_targets[:, :2], pos_points + pos_bbox_targets[:, 2:]), -1)
        loss_bbox = (mmdet_box_loss(dec_pred, dec_tgt, kind) * pos_centerness_targets).sum() / (
            centerness_denorm + EPS32
        )
        loss_centerness = TF.binary_cross_entropy_with_logits(
            pos_centerness, pos_centerness_targets, reduction="sum"
        ) / (num_pos + EPS32)
    else:
        loss_bbox = pos_bbox_preds.sum()
        loss_centerness = pos_centerness.sum()
    return loss_cls, loss_bbox, loss_centerness


def _scene(seed, batch=2, num_classes=4, h=160, w=128, empty_first=False):
    g = torch.Generator().manual_seed(seed)
    fs = _feature_sizes(h, w)
    p = sum(a * b for a, b in fs)
    boxes_list, labels_list = [], []
    for i in range(batch):
        n = 0 if (empty_first and i == 0) else 6
        xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h]) * 0.8
        wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 90 + 4
        boxes_list.append(torch.cat((xy, xy + wh), dim=1))
        labels_list.append(torch.randint(0, num_classes, (n,), generator=g))
    cls = torch.randn(batch, p, num_classes, generator=g, dtype=torch.float64)
    reg = torch.rand(batch, p, 4, generator=g, dtype=torch.float64) * 40 + 1
    ctr = torch.randn(batch, p, 1, generator=g, dtype=torch.float64)
    return fs, boxes_list, labels_list, [cls, reg, ctr]


@pytest.mark.parametrize(
    "center_sampling, norm_on_bbox, kind, empty_first",
    [
        (False, False, "log_iou", False),  # FCOSHead defaults
        (True, True, "giou", False),  # fcos_center-normbbox-centeronreg-giou
        (True, False, "giou", True),
        (False, True, "log_iou", True),
    ],
)
def test_matches_mmdet_transcription(center_sampling, norm_on_bbox, kind, empty_first):
    fs, boxes_list, labels_list, heads = _scene(1, empty_first=empty_first)
    if norm_on_bbox:
        heads[1] = heads[1] / 8
    ref_heads = [h.clone().requires_grad_() for h in heads]
    ref = mmdet_loss(*ref_heads, fs, boxes_list, labels_list, 4, center_sampling, norm_on_bbox, kind)
    sum(ref).backward()
    loss_fn = FCOSLoss(
        4, convention="mmdet", center_sampling=center_sampling, norm_on_bbox=norm_on_bbox, box_loss=kind
    )
    ours_heads = [h.clone().requires_grad_() for h in heads]
    targets = [{"boxes": b, "labels": lb} for b, lb in zip(boxes_list, labels_list)]
    out = loss_fn(*ours_heads, fs, targets)
    out.total.backward()
    assert out.stats["num_pos"] > 0
    # cls and centerness involve no IoU: they agree to rounding; the box term to 1e-6 (eps placement)
    for name, r, tol in zip(("cls", "box", "centerness"), ref, (1e-12, 1e-6, 1e-12)):
        torch.testing.assert_close(out.components[name], r.detach(), rtol=tol, atol=0, msg=name)
    for h, r, tol in zip(ours_heads, ref_heads, (1e-10, 1e-6, 1e-10)):
        torch.testing.assert_close(h.grad, r.grad, rtol=tol, atol=1e-14)


def test_mmdet_all_empty_is_finite_with_zero_box_gradients():
    fs, _, _, heads = _scene(2, batch=2)
    heads = [h.requires_grad_() for h in heads]
    targets = [{"boxes": torch.zeros(0, 4, dtype=torch.float64), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    out = FCOSLoss(4, convention="mmdet", center_sampling=True)(*heads, fs, targets)
    out.total.backward()
    assert torch.isfinite(out.total) and out.components["box"].item() == 0.0
    assert torch.all(heads[1].grad == 0) and torch.all(heads[2].grad == 0)
    assert out.stats["box_normalizer"] == 1e-6 and out.stats["normalizer"] == 1.0


def test_mmdet_gradcheck_float64():
    fs = [(2, 2), (1, 1), (1, 1), (1, 1), (1, 1)]
    p = 8
    targets = [{"boxes": torch.tensor([[1.0, 1.0, 14.0, 13.0], [3.0, 2.0, 16.0, 15.0]], dtype=torch.float64),
                "labels": torch.tensor([0, 1])}]
    g = torch.Generator().manual_seed(3)
    cls = torch.randn(1, p, 2, generator=g, dtype=torch.float64, requires_grad=True)
    reg = (torch.rand(1, p, 4, generator=g, dtype=torch.float64) * 8 + 1).requires_grad_()
    ctr = torch.randn(1, p, 1, generator=g, dtype=torch.float64, requires_grad=True)
    loss_fn = FCOSLoss(2, convention="mmdet", box_loss="giou")
    assert loss_fn(cls, reg, ctr, fs, targets).stats["num_pos"] > 0
    assert torch.autograd.gradcheck(lambda c, r, z: loss_fn(c, r, z, fs, targets).total, (cls, reg, ctr))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mmdet_half_precision(dtype):
    fs, boxes_list, labels_list, heads = _scene(4)
    targets = [{"boxes": b.float(), "labels": lb} for b, lb in zip(boxes_list, labels_list)]
    halves = [h.to(dtype).requires_grad_() for h in heads]
    out = FCOSLoss(4, convention="mmdet", center_sampling=True, box_loss="giou")(*halves, fs, targets)
    out.total.backward()
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    assert all(h.grad.dtype == dtype and torch.isfinite(h.grad).all() for h in halves)
    ref = FCOSLoss(4, convention="mmdet", center_sampling=True, box_loss="giou")(
        *[h.detach().double() for h in halves], fs, targets
    )
    assert math.isclose(out.total.item(), ref.total.item(), rel_tol=1e-4)


def test_mmdet_center_sample_radius_alias():
    fs, boxes_list, labels_list, heads = _scene(5)
    targets = [{"boxes": b, "labels": lb} for b, lb in zip(boxes_list, labels_list)]
    a = FCOSLoss(4, convention="mmdet", center_sampling=True, center_sample_radius=2.5)
    b = FCOSLoss(4, convention="mmdet", center_sampling=True, center_sampling_radius=2.5)
    c = FCOSLoss(4, convention="mmdet", center_sampling=True)
    assert a.center_sampling_radius == 2.5
    ma, mb, mc = (torch.stack(f.assign(*heads, fs, targets).matched_idxs()) for f in (a, b, c))
    assert torch.equal(ma, mb) and not torch.equal(ma, mc)
