"""Finite input gives finite output, for boxes at the ends of the float32 range: coordinates around
1e19-1e30 (areas and squared diagonals overflow unless scaled) and sides of 1e-20 (their products
underflow), through every IoU function and through FCOSLoss (whose decoded boxes reach 1e31 when
its regression output is 1e30).

Expected values are either analytic (IoU of boxes whose overlap is known) or the float64 result on
the same float32 values, where no overflow or underflow happens (float64 reaches 1e308).
"""
from __future__ import annotations

import pytest
import torch

import detloss.functional as F

FUSED_KINDS = ("iou", "giou", "diou", "ciou")
ALL_KINDS = FUSED_KINDS + ("eiou", "siou")
CONVENTIONS = ("torchvision", "yolov5")


def _pairs(n: int, scale: float, seed: int = 0):
    """Overlapping xyxy float32 pairs whose coordinates are about ``scale``."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64)
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 + 0.2
    target = torch.cat([xy, xy + wh], 1)
    pred = target + torch.randn(n, 4, generator=g, dtype=torch.float64) * 0.3
    pred = torch.cat([pred[:, :2], torch.maximum(pred[:, 2:], pred[:, :2] + 0.05)], 1)
    return (pred * scale).float(), (target * scale).float()


def _value_and_grad(fn, *boxes):
    leaves = [b.detach().clone().requires_grad_() for b in boxes]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves)
    return out.detach(), grads


@pytest.mark.parametrize("scale", [1e19, 1e20, 1e30, 1e37])
@pytest.mark.parametrize("kind", ALL_KINDS)
@pytest.mark.parametrize("convention", CONVENTIONS)
def test_huge_float32_boxes_equal_float64(scale, kind, convention, monkeypatch):
    """iou_loss on the plain and on the (eager) fused path, aligned_box_iou, pairwise_box_iou."""
    monkeypatch.setenv("DETLOSS_COMPILE", "0")
    pred, target = _pairs(64, scale)
    p64, t64 = pred.double(), target.double()
    for fused in ("0", "1"):
        monkeypatch.setenv("DETLOSS_FUSED", fused)
        monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "0")
        fn = lambda a, b: F.iou_loss(a, b, kind=kind, convention=convention)  # noqa: E731
        value, (grad, _) = _value_and_grad(fn, pred, target)
        value64, (grad64, _) = _value_and_grad(fn, p64, t64)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(value, value64.float(), rtol=1e-4, atol=1e-5)
        # gradients are ~1 / scale: compare them in units of the boxes
        torch.testing.assert_close(grad * scale, (grad64 * scale).float(), rtol=1e-3, atol=1e-4)
    aligned = F.aligned_box_iou(pred, target, kind=kind, convention=convention)
    torch.testing.assert_close(aligned, F.aligned_box_iou(p64, t64, kind=kind, convention=convention).float(),
                               rtol=1e-4, atol=1e-5)
    matrix = F.pairwise_box_iou(pred[:8], target[:5], kind=kind, convention=convention)
    torch.testing.assert_close(matrix, F.pairwise_box_iou(p64[:8], t64[:5], kind=kind, convention=convention).float(),
                               rtol=1e-4, atol=1e-5)


def test_huge_boxes_analytic_iou_and_giou():
    """[0, 0, 2s, 2s] and [s, s, 3s, 3s]: intersection s^2, union 7 s^2, enclosing box 9 s^2."""
    for s in (1e19, 1e20, 1e35):
        a = torch.tensor([[0.0, 0.0, 2 * s, 2 * s]])
        b = torch.tensor([[s, s, 3 * s, 3 * s]])
        torch.testing.assert_close(F.box_iou(a, b), torch.tensor([[1 / 7]]))
        torch.testing.assert_close(F.aligned_box_iou(a, b, kind="giou"), torch.tensor([1 / 7 - 2 / 9]))
        torch.testing.assert_close(F.iou_loss(a, b, kind="giou"), torch.tensor([1 - 1 / 7 + 2 / 9]))


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_pairwise_tiny_sides_have_the_true_gradient(kind):
    """Sides of 1e-20 (float32): the IoU of such boxes is scale-free, and its gradient (~1e20)
    fits in float32; unscaled, the areas (1e-40) lose their digits and the gradient is NaN or -inf."""
    pred, target = _pairs(6, 1e-20, seed=1)
    fn = lambda a, b: F.pairwise_box_iou(a, b, kind=kind)  # noqa: E731
    value, grads = _value_and_grad(fn, pred, target)
    value64, grads64 = _value_and_grad(fn, pred.double(), target.double())
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value, value64.float(), rtol=1e-4, atol=1e-5)
    for g, g64 in zip(grads, grads64):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g * 1e-20, (g64 * 1e-20).float(), rtol=1e-3, atol=1e-4)


def test_ordinary_boxes_are_unchanged_by_the_scaling():
    """The power-of-two scaling is exact: IoUs of ordinary boxes are the unscaled formula's, bit for
    bit (the unscaled torchvision GIoU written out here)."""
    pred, target = _pairs(200, 100.0, seed=2)
    x1, y1, x2, y2 = pred.unbind(-1)
    X1, Y1, X2, Y2 = target.unbind(-1)
    iw = (torch.min(x2, X2) - torch.max(x1, X1))
    ih = (torch.min(y2, Y2) - torch.max(y1, Y1))
    inter = torch.where((ih > 0) & (iw > 0), iw * ih, torch.zeros_like(iw))
    union = (x2 - x1) * (y2 - y1) + (X2 - X1) * (Y2 - Y1) - inter
    area_c = (torch.max(x2, X2) - torch.min(x1, X1)) * (torch.max(y2, Y2) - torch.min(y1, Y1))
    giou = inter / (union + 1e-7) - (area_c - union) / (area_c + 1e-7)
    assert torch.equal(F.aligned_box_iou(pred, target, kind="giou"), giou)


def _fcos_heads(regression_scale: float):
    g = torch.Generator().manual_seed(0)
    p, c = 86, 2  # 64 x 64 image, strides 8-128
    return [
        torch.randn(1, p, c, generator=g).requires_grad_(),
        (torch.rand(1, p, 4, generator=g) * regression_scale).requires_grad_(),
        torch.randn(1, p, 1, generator=g).requires_grad_(),
    ]


@pytest.mark.parametrize("regression_scale", [1e20, 1e30])
def test_fcos_loss_with_huge_regression_is_finite(regression_scale):
    """FCOSLoss decodes the regression into boxes of ~1e31 px and takes their GIoU with the target
    (torchvision convention); its loss and gradients stay finite."""
    from detloss import FCOSLoss

    heads = _fcos_heads(regression_scale)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1])}]
    out = FCOSLoss(2)(*heads, [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)], targets)
    assert out.stats["num_pos"] > 0
    out.total.backward()
    assert torch.isfinite(out.total)
    assert all(torch.isfinite(h.grad).all() for h in heads)
    # each prediction contains its target and is its own enclosing box: IoU ~ 0, no GIoU penalty
    assert float(out.components["box"]) == pytest.approx(1.0, abs=1e-6)
