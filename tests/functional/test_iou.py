"""IoU family beyond the reference arrays: EIoU / SIoU against scalar transcriptions of the papers'
formulas, format and pairwise consistency, degenerate boxes."""
from __future__ import annotations

import math

import pytest
import torch

import detloss.functional as F

PAIRS = [
    ([0.0, 0.0, 2.0, 2.0], [1.0, 1.0, 3.0, 4.0]),
    ([0.0, 0.0, 4.0, 1.0], [5.0, 3.0, 6.0, 9.0]),     # disjoint
    ([1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 3.0, 3.0]),     # nested
    ([0.0, 0.0, 2.0, 2.0], [0.0, 3.0, 2.0, 5.0]),     # aligned vertically: alpha = 90 degrees
    ([10.0, 20.0, 30.0, 25.0], [12.0, 18.0, 33.0, 26.0]),
]


def _scalar_parts(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    w1, h1, w2, h2 = a[2] - a[0], a[3] - a[1], b[2] - b[0], b[3] - b[1]
    inter = ix * iy
    union = w1 * h1 + w2 * h2 - inter
    cw = max(a[2], b[2]) - min(a[0], b[0])
    ch = max(a[3], b[3]) - min(a[1], b[1])
    dx = (b[0] + b[2]) / 2 - (a[0] + a[2]) / 2
    dy = (b[1] + b[3]) / 2 - (a[1] + a[3]) / 2
    return inter / union, w1, h1, w2, h2, cw, ch, dx, dy


def eiou_paper(a, b):
    """Zhang et al. 2021: L = 1 - IoU + rho^2/c^2 + rho^2(w, w_gt)/Cw^2 + rho^2(h, h_gt)/Ch^2."""
    iou, w1, h1, w2, h2, cw, ch, dx, dy = _scalar_parts(a, b)
    return 1 - iou + (dx * dx + dy * dy) / (cw * cw + ch * ch) + (w1 - w2) ** 2 / cw ** 2 + (h1 - h2) ** 2 / ch ** 2


def siou_paper(a, b, theta=4.0):
    """Gevorgyan 2022, eqs. 1-10: Lambda = 1 - 2 sin^2(arcsin(x) - pi/4), x = c_h / sigma;
    Delta = sum 1 - exp(-gamma rho_t), gamma = 2 - Lambda; Omega = sum (1 - exp(-omega_t))^theta;
    L = 1 - IoU + (Delta + Omega) / 2."""
    iou, w1, h1, w2, h2, cw, ch, dx, dy = _scalar_parts(a, b)
    sigma = math.hypot(dx, dy)
    x = abs(dy) / sigma if sigma > 0 else 0.0
    lam = 1 - 2 * math.sin(math.asin(min(x, 1.0)) - math.pi / 4) ** 2 if sigma > 0 else 0.0
    gamma = 2 - lam
    delta = sum(1 - math.exp(-gamma * r) for r in ((dx / cw) ** 2, (dy / ch) ** 2))
    omega = sum((1 - math.exp(-o)) ** theta for o in (abs(w1 - w2) / max(w1, w2), abs(h1 - h2) / max(h1, h2)))
    return 1 - iou + (delta + omega) / 2


@pytest.mark.parametrize("convention", ["torchvision", "yolov5"])
@pytest.mark.parametrize("kind,paper", [("eiou", eiou_paper), ("siou", siou_paper)])
def test_eiou_siou_match_paper_formulas(kind, paper, convention):
    b1 = torch.tensor([p[0] for p in PAIRS], dtype=torch.float64)
    b2 = torch.tensor([p[1] for p in PAIRS], dtype=torch.float64)
    expected = torch.tensor([paper(a, b) for a, b in PAIRS], dtype=torch.float64)
    got = F.iou_loss(b1, b2, kind=kind, convention=convention, eps=0.0 if convention == "torchvision" else 1e-7)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou", "eiou", "siou"])
@pytest.mark.parametrize("convention", ["torchvision", "yolov5"])
def test_identical_boxes_give_one_and_zero_size_is_finite(kind, convention):
    b = torch.tensor([[0.0, 0.0, 2.0, 3.0], [5.0, 5.0, 5.0, 5.0], [1.0, 1.0, 1.0, 4.0]], requires_grad=True)
    v = F.aligned_box_iou(b, b.detach().clone(), kind=kind, convention=convention)
    assert v[0].item() == pytest.approx(1.0, abs=1e-6)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou", "eiou", "siou"])
@pytest.mark.parametrize("convention", ["torchvision", "yolov5"])
def test_box_format_consistency(kind, convention):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 20, 2, generator=g, dtype=torch.float64) * 10
    wh = torch.rand(2, 20, 2, generator=g, dtype=torch.float64) * 4 + 0.1
    xyxy = torch.cat([xy, xy + wh], -1)
    cxcywh = torch.cat([xy + wh / 2, wh], -1)
    a = F.aligned_box_iou(xyxy[0], xyxy[1], kind=kind, convention=convention, eps=0.0 if convention == "torchvision" else 1e-7)
    b = F.aligned_box_iou(cxcywh[0], cxcywh[1], kind=kind, convention=convention, box_format="cxcywh",
                  eps=0.0 if convention == "torchvision" else 1e-7)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # yolov5 puts eps on xyxy heights only


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou", "eiou", "siou"])
@pytest.mark.parametrize("convention", ["torchvision", "yolov5"])
def test_pairwise_equals_aligned_on_all_pairs(kind, convention):
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(7, 2, generator=g, dtype=torch.float64) * 50
    b1 = torch.cat([xy[:3], xy[:3] + 10], 1)
    b2 = torch.cat([xy[3:], xy[3:] + 7], 1)
    m = F.pairwise_box_iou(b1, b2, kind=kind, convention=convention)
    assert m.shape == (3, 4)
    aligned = F.aligned_box_iou(b1[:, None].expand(3, 4, 4).reshape(-1, 4), b2[None].expand(3, 4, 4).reshape(-1, 4),
                        kind=kind, convention=convention).view(3, 4)
    torch.testing.assert_close(m, aligned, rtol=1e-6, atol=1e-8)  # torchvision's matrices: no eps on the union


def test_pairwise_zero_union_is_zero_not_nan():
    p = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    for kind in ("iou", "giou", "diou", "ciou"):
        assert torch.isfinite(F.pairwise_box_iou(p, p, kind=kind)).all()


def test_empty_boxes():
    e = torch.zeros(0, 4, requires_grad=True)
    assert F.iou_loss(e, e, reduction="mean").item() == 0.0
    assert F.pairwise_box_iou(e, torch.zeros(3, 4)).shape == (0, 3)
    assert F.aligned_box_iou(e, e).shape == (0,)


def test_dfl_last_bin_and_integer_target():
    logits = torch.randn(3, 8, dtype=torch.float64)
    logp = torch.log_softmax(logits, 1)
    out = F.distribution_focal_loss(logits, torch.tensor([7.0, 3.0, 2.25], dtype=torch.float64), reduction="none")
    expected = torch.stack([-logp[0, 7], -logp[1, 3], -(0.75 * logp[2, 2] + 0.25 * logp[2, 3])])
    torch.testing.assert_close(out, expected)


def test_ciou_flat_box_angle_is_pi_over_two_in_float64():
    """A box of zero height has the limit angle pi/2 in the computing dtype (a float32 constant
    would put the float64 CIoU 4e-8 off the value computed by hand)."""
    pred = torch.tensor([[0.0, 0.0, 2.0, 0.0]], dtype=torch.float64)  # w = 2, h = 0
    target = torch.tensor([[0.0, -1.0, 1.0, 2.0]], dtype=torch.float64)  # w = 1, h = 3
    got = F.aligned_box_iou(pred, target, kind="ciou", convention="torchvision")
    # IoU = 0 (no area in common), centre distance^2 = 0.5^2 + 0.5^2, enclosing diagonal^2 =
    # 2^2 + 3^2, eps = 1e-7 on the diagonal and in alpha's denominator (torchvision)
    v = 4 / math.pi**2 * (math.atan(1 / 3) - math.pi / 2) ** 2
    alpha = v / (1 - 0.0 + v + 1e-7)
    want = 0.0 - 0.5 / (13 + 1e-7) - alpha * v
    assert got.item() == pytest.approx(want, rel=1e-14, abs=1e-15)
