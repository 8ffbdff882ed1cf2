"""torch.autograd.gradcheck in float64 for every differentiable functional loss."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import detloss.functional as F

D = torch.float64


def rnd(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=D) * scale).requires_grad_(True)


def unit(*shape, seed=0, low=0.05, high=0.95):
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(*shape, generator=g, dtype=D)).requires_grad_(True)


def boxes(n, seed=0, fmt="xyxy"):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=D) * 10
    wh = torch.rand(n, 2, generator=g, dtype=D) * 5 + 0.5
    b = torch.cat([xy, xy + wh], 1) if fmt == "xyxy" else torch.cat([xy, wh], 1)
    return b.requires_grad_(True)


def test_bce_with_logits():
    pw = torch.rand(4, dtype=D, requires_grad=True)
    w = torch.rand(3, 1, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, y, w, pw: F.bce_with_logits(x, y, weight=w, pos_weight=pw, reduction="sum"),
                     (rnd(3, 4, scale=3), unit(3, 4, seed=1), w, pw))


def test_bce_with_logits_second_order():
    from torch.autograd import gradgradcheck
    assert gradgradcheck(lambda x: F.bce_with_logits(x, torch.full_like(x, 0.3), reduction="sum"), (rnd(5, scale=3),))


def test_binary_cross_entropy():
    assert gradcheck(lambda p, y: F.binary_cross_entropy(p, y, reduction="mean"), (unit(3, 4), unit(3, 4, seed=2)))


def test_bce_blur():
    assert gradcheck(lambda x, y: F.bce_blur(x, y), (rnd(3, 4, scale=2), unit(3, 4, seed=1)))


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("ls", [0.0, 0.2])
def test_cross_entropy(soft, ls):
    x = rnd(4, 3, 2)
    w = torch.rand(3, dtype=D) + 0.5
    if soft:
        q = torch.softmax(torch.randn(4, 3, 2, dtype=D), 1).requires_grad_(True)
        assert gradcheck(lambda x, q: F.cross_entropy(x, q, weight=w, label_smoothing=ls), (x, q))
    else:
        t = torch.tensor([[0, 1], [2, -100], [1, 1], [0, 2]])
        assert gradcheck(lambda x: F.cross_entropy(x, t, weight=w, label_smoothing=ls), (x,))


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 1.5), (0.25, 0.0)])
def test_sigmoid_focal(alpha, gamma):
    assert gradcheck(lambda x, y: F.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction="sum"),
                     (rnd(3, 5, scale=2), unit(3, 5, seed=3)))


def test_softmax_focal():
    t = torch.tensor([0, 2, 1, -100])
    assert gradcheck(lambda x: F.softmax_focal_loss(x, t, gamma=2.0), (rnd(4, 3),))


@pytest.mark.parametrize("alpha", [None, 0.25])
def test_quality_focal(alpha):
    assert gradcheck(lambda x, y: F.quality_focal_loss(x, y, alpha=alpha), (rnd(3, 5), unit(3, 5, seed=4)))


def test_varifocal():
    lab = (torch.rand(3, 5, generator=torch.Generator().manual_seed(5)) > 0.5).to(D)
    assert gradcheck(lambda x, q: F.varifocal_loss(x, q, lab), (rnd(3, 5), unit(3, 5, seed=6)))


@pytest.mark.parametrize("name,kw", [("smooth_l1_loss", {"beta": 0.7}), ("l1_loss", {}), ("mse_loss", {})])
def test_regression(name, kw):
    assert gradcheck(lambda x, y: getattr(F, name)(x, y, **kw), (rnd(10), rnd(10, seed=9)))


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "eiou", "siou"])  # ciou: below
@pytest.mark.parametrize("convention", ["torchvision", "yolov5"])
@pytest.mark.parametrize("fmt", ["xyxy", "cxcywh"])
def test_iou_loss(kind, convention, fmt):
    b1, b2 = boxes(6, 0, fmt), boxes(6, 1, fmt)
    assert gradcheck(lambda a, b: F.iou_loss(a, b, kind=kind, box_format=fmt, convention=convention,
                                             reduction="sum"), (b1, b2))


@pytest.mark.parametrize("convention", ["torchvision", "yolov5"])
def test_ciou_with_frozen_alpha(convention):
    # CIoU's alpha is a no-grad factor: its gradient is d(DIoU) - alpha * dv, which gradcheck
    # verifies against finite differences of DIoU - alpha_fixed * v.
    import math
    b1, b2 = boxes(6, 0), boxes(6, 1)
    with torch.no_grad():
        iou = F.aligned_box_iou(b1, b2, kind="iou", convention=convention)
        eps = 1e-7
        h1 = b1[:, 3] - b1[:, 1] + (eps if convention == "yolov5" else 0)
        h2 = b2[:, 3] - b2[:, 1] + (eps if convention == "yolov5" else 0)
        v = 4 / math.pi ** 2 * (torch.atan((b2[:, 2] - b2[:, 0]) / h2) - torch.atan((b1[:, 2] - b1[:, 0]) / h1)) ** 2
        alpha = v / (v - iou + 1 + eps) if convention == "yolov5" else v / (1 - iou + v + eps)

    def frozen(a, b):
        ha = a[:, 3] - a[:, 1] + (eps if convention == "yolov5" else 0)
        hb = b[:, 3] - b[:, 1] + (eps if convention == "yolov5" else 0)
        vv = 4 / math.pi ** 2 * (torch.atan((b[:, 2] - b[:, 0]) / hb) - torch.atan((a[:, 2] - a[:, 0]) / ha)) ** 2
        return F.aligned_box_iou(a, b, kind="diou", convention=convention) - alpha * vv

    a1, a2 = b1.detach().clone().requires_grad_(True), b2.detach().clone().requires_grad_(True)
    g_ours = torch.autograd.grad(F.aligned_box_iou(a1, a2, kind="ciou", convention=convention).sum(), (a1, a2))
    g_frozen = torch.autograd.grad(frozen(b1, b2).sum(), (b1, b2))
    for a, b in zip(g_ours, g_frozen):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert gradcheck(frozen, (b1, b2))


def test_pairwise_box_iou():
    assert gradcheck(lambda a, b: F.pairwise_box_iou(a, b, kind="giou"), (boxes(3, 0), boxes(4, 1)))


def test_distribution_focal_loss():
    g = torch.Generator().manual_seed(7)
    target = (torch.rand(6, generator=g, dtype=D) * 14.5 + 0.2).requires_grad_(True)
    w = torch.rand(6, dtype=D, requires_grad=True)
    assert gradcheck(lambda p, t, w: F.distribution_focal_loss(p, t, weight=w), (rnd(6, 16), target, w))
