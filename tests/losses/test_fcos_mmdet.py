"""FCOSLoss(convention="mmdet") against :func:`mmdet_by_rules`, mmdetection 3.x FCOSHead's loss
written here from the rules detloss.losses.fcos's module docstring states (no copy of mmdet's code).

No reference data from mmdetection is stored. The rules: every point's box from the matcher
rules (:func:`test_fcos_assign.mmdet_dense_match`), its distance targets ``(l, t, r, b)`` to
that box (in strides with ``norm_on_bbox``); the sigmoid focal loss ``-alpha_t (1 - p_t)^gamma
log p_t`` (alpha 0.25, gamma 2) of every point and class against the one-hot labels over
``max(#positives, 1)``; the centerness target ``c* = sqrt(min(l, r) / max(l, r) * min(t, b) /
max(t, b))``; the box loss of the positives' prediction and target decoded around their point
(GIoU loss ``1 - IoU + (C - U) / C``, or ``-log(max(IoU, 1e-6))``), weighted by ``c*``, over
``max(sum c*, 1e-6)``; the BCE of the centerness logits against ``c*`` over ``max(#positives, 1)``;
each divisor plus float32's eps. FCOSLoss keeps torchvision's ``eps`` placement inside the IoU
formulas (the rules have none), so the box term agrees to 1e-6 relative, the others to rounding.
The torchvision convention is pinned by stored reference data (tests/data/torchvision_fcos/,
SOURCE: "torchvision 0.29.1+cu130 ... FCOS.compute_loss (matcher) -> FCOSHead.compute_loss. Run
unmodified on CPU in float64.") in test_fcos.py.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as TF

from detloss.losses.fcos import FCOSLoss

from test_fcos_assign import STRIDES, _feature_sizes, mmdet_dense_match, mmdet_points

EPS32 = torch.finfo(torch.float32).eps


def focal_by_definition(logits, labels, alpha=0.25, gamma=2.0):
    """``-alpha_t (1 - p_t)^gamma log(p_t)`` elementwise: ``p_t = p`` and ``alpha_t = alpha`` on the
    positive class, ``p_t = 1 - p`` and ``alpha_t = 1 - alpha`` elsewhere."""
    p = torch.sigmoid(logits)
    pos = -alpha * (1 - p) ** gamma * TF.logsigmoid(logits)
    neg = -(1 - alpha) * p ** gamma * TF.logsigmoid(-logits)
    return torch.where(labels > 0, pos, neg)


def iou_and_enclosure(a, b):
    """IoU, union and the area of the smallest enclosing box of aligned xyxy boxes, by definition."""
    w = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    h = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    inter = w * h
    union = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]) + (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]) - inter
    enclosure = (torch.maximum(a[:, 2], b[:, 2]) - torch.minimum(a[:, 0], b[:, 0])) * (
        torch.maximum(a[:, 3], b[:, 3]) - torch.minimum(a[:, 1], b[:, 1])
    )
    return inter / union, union, enclosure


def mmdet_by_rules(cls, reg, ctr, fs, boxes_list, labels_list, num_classes, center_sampling, norm_on_bbox, kind):
    """The three terms (cls, box, centerness) on ``[B, P, ...]`` head outputs, one process."""
    points, strides = mmdet_points(fs)
    cls_sum = cls.new_zeros(())
    pos_reg, pos_ctr, pos_points, pos_targets = [], [], [], []
    for b, (boxes, labels) in enumerate(zip(boxes_list, labels_list)):
        match = mmdet_dense_match(points, strides, fs, boxes, center_sampling)
        fg = match >= 0
        onehot = torch.zeros(points.shape[0], num_classes, dtype=cls.dtype)
        onehot[fg, labels[match[fg]]] = 1.0
        cls_sum = cls_sum + focal_by_definition(cls[b], onehot).sum()
        box = boxes[match[fg]]
        pt = points[fg]
        ltrb = torch.cat((pt - box[:, :2], box[:, 2:] - pt), 1)
        if norm_on_bbox:
            ltrb = ltrb / strides[fg, None]
        pos_reg.append(reg[b][fg])
        pos_ctr.append(ctr[b].reshape(-1)[fg])
        pos_points.append(pt)
        pos_targets.append(ltrb)
    reg_p, ctr_p, pts, ltrb = (torch.cat(v) for v in (pos_reg, pos_ctr, pos_points, pos_targets))
    n_pos = ltrb.shape[0]
    num = max(float(n_pos), 1.0) + EPS32
    loss_cls = cls_sum / num
    if n_pos == 0:
        return loss_cls, reg.sum() * 0, ctr.sum() * 0
    lr, tb = ltrb[:, [0, 2]], ltrb[:, [1, 3]]
    c_star = torch.sqrt(lr.min(1).values / lr.max(1).values * (tb.min(1).values / tb.max(1).values))
    pred = torch.cat((pts - reg_p[:, :2], pts + reg_p[:, 2:]), 1)
    target = torch.cat((pts - ltrb[:, :2], pts + ltrb[:, 2:]), 1)
    iou, union, enclosure = iou_and_enclosure(pred, target)
    per_box = 1 - iou + (enclosure - union) / enclosure if kind == "giou" else -iou.clamp(min=1e-6).log()
    loss_box = (per_box * c_star).sum() / (max(float(c_star.sum()), 1e-6) + EPS32)
    bce = -(c_star * TF.logsigmoid(ctr_p) + (1 - c_star) * TF.logsigmoid(-ctr_p))
    return loss_cls, loss_box, bce.sum() / num


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
def test_matches_mmdets_rules(center_sampling, norm_on_bbox, kind, empty_first):
    fs, boxes_list, labels_list, heads = _scene(1, empty_first=empty_first)
    if norm_on_bbox:
        heads[1] = heads[1] / 8
    ref_heads = [h.clone().requires_grad_() for h in heads]
    ref = mmdet_by_rules(*ref_heads, fs, boxes_list, labels_list, 4, center_sampling, norm_on_bbox, kind)
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
