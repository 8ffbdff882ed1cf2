"""Rotated boxes: ProbIoU against the Bhattacharyya coefficient integrated numerically, its
invariances, the conversions' round trips, the angle loss, gradcheck, properties and bad input.

The oracle comparison with ultralytics' own ``probiou`` / ``dist2rbox`` / ``rbox2dist`` lives in
integration_tests/test_ultralytics_task_pieces.py; the losses built on these pieces are checked
against ultralytics 8.4.190 in tests/losses/test_obb*.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import detloss.functional as F
import detloss.nn as dnn

D = torch.float64


def rboxes(n, seed=0, min_side=0.5):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=D) * 20
    wh = torch.rand(n, 2, generator=g, dtype=D) * 8 + min_side
    r = torch.rand(n, 1, generator=g, dtype=D) * 3 - 1
    return torch.cat((xy, wh, r), 1)


def gaussian_bc(b1, b2, floor=0.0, n=801, half=40.0):
    """Bhattacharyya coefficient of the boxes' Gaussians by numerical integration on a grid."""
    def cov(b):
        w, h, r = float(b[2]), float(b[3]), float(b[4])
        rot = np.array([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]])
        return rot @ np.diag([w * w / 12 + floor, h * h / 12 + floor]) @ rot.T

    def pdf(xy, mu, s):
        d = xy - mu
        inv = np.linalg.inv(s)
        q = np.einsum("...i,ij,...j->...", d, inv, d)
        return np.exp(-0.5 * q) / (2 * math.pi * math.sqrt(np.linalg.det(s)))

    c = (np.asarray(b1[:2]) + np.asarray(b2[:2])) / 2
    xs = np.linspace(c[0] - half, c[0] + half, n)
    ys = np.linspace(c[1] - half, c[1] + half, n)
    xy = np.stack(np.meshgrid(xs, ys, indexing="ij"), -1)
    p = pdf(xy, np.asarray(b1[:2]), cov(b1))
    q = pdf(xy, np.asarray(b2[:2]), cov(b2))
    return float(np.sqrt(p * q).sum() * (xs[1] - xs[0]) * (ys[1] - ys[0]))


@pytest.mark.parametrize("floor", [0.0, 0.01, 0.5])
def test_probiou_is_one_minus_hellinger_of_the_gaussians(floor):
    b1, b2 = rboxes(6, seed=1), rboxes(6, seed=2)
    b2[:, :2] = b1[:, :2] + torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=D) * 2
    got = F.probiou(b1, b2, floor=floor)
    for i in range(6):
        bc = gaussian_bc(b1[i].tolist(), b2[i].tolist(), floor)
        expected = 1 - math.sqrt(max(1 - bc, 0.0))
        assert abs(float(got[i]) - expected) < 2e-4, (i, float(got[i]), expected)


def test_probiou_invariances():
    b1, b2 = rboxes(50, seed=4), rboxes(50, seed=5)
    base = F.probiou(b1, b2)
    torch.testing.assert_close(F.probiou(b2, b1), base, rtol=0, atol=1e-15)  # symmetric
    # rotating the scene about the origin
    th = 0.7
    rot = torch.tensor([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]], dtype=D)

    def turn(b):
        return torch.cat((b[:, :2] @ rot.T, b[:, 2:4], b[:, 4:] + th), 1)

    torch.testing.assert_close(F.probiou(turn(b1), turn(b2)), base, rtol=1e-9, atol=1e-12)
    # the angle has period pi, and (w, h, r) is the same box as (h, w, r + pi/2)
    shifted = b1.clone()
    shifted[:, 4] += math.pi
    torch.testing.assert_close(F.probiou(shifted, b2), base, rtol=1e-9, atol=1e-12)
    swapped = torch.cat((b1[:, :2], b1[:, 3:4], b1[:, 2:3], b1[:, 4:] + math.pi / 2), 1)
    torch.testing.assert_close(F.probiou(swapped, b2), base, rtol=1e-9, atol=1e-12)
    # identical boxes: 1 - sqrt(1 - exp(-eps) + eps)
    eps = 1e-7
    torch.testing.assert_close(F.probiou(b1, b1), torch.full((50,), 1 - math.sqrt(1 - math.exp(-eps) + eps), dtype=D))
    # far apart: the Bhattacharyya distance is clamped at 100
    far = b1.clone()
    far[:, 0] += 1e4
    torch.testing.assert_close(F.probiou(far, b2), torch.full((50,), 1 - math.sqrt(1 - math.exp(-100) + eps), dtype=D))


def test_probiou_loss_and_module():
    p, t = rboxes(7, seed=6), rboxes(7, seed=7)
    w = torch.rand(7, dtype=D)
    expected = (1 - F.probiou(p, t, floor=0.01)) * w
    torch.testing.assert_close(F.probiou_loss(p, t, weight=w), expected)
    torch.testing.assert_close(F.probiou_loss(p, t, weight=w, reduction="sum"), expected.sum())
    torch.testing.assert_close(dnn.ProbIoULoss(reduction="mean")(p, t, w), expected.mean())


def test_covariance_of_a_rotated_box():
    b = torch.tensor([[0.0, 0.0, 6.0, 2.0, 0.4]], dtype=D)
    a, bb, c = F.rbox_covariance(b, floor=0.1)
    r = 0.4
    rot = torch.tensor([[math.cos(r), -math.sin(r)], [math.sin(r), math.cos(r)]], dtype=D)
    s = rot @ torch.diag(torch.tensor([36 / 12 + 0.1, 4 / 12 + 0.1], dtype=D)) @ rot.T
    torch.testing.assert_close(torch.stack((a[0], bb[0], c[0])), torch.stack((s[0, 0], s[1, 1], s[0, 1])))


def test_corners():
    b = rboxes(20, seed=8)
    c = F.xywhr_to_corners(b)
    assert c.shape == (20, 4, 2)
    torch.testing.assert_close(c.mean(1), b[:, :2])
    x, y = c[..., 0], c[..., 1]
    area = 0.5 * (x * y.roll(-1, 1) - x.roll(-1, 1) * y).sum(1).abs()  # shoelace
    torch.testing.assert_close(area, b[:, 2] * b[:, 3])
    side = (c[:, 0] - c[:, 3]).norm(dim=1)  # pt1 - pt4 = 2u, the width side
    torch.testing.assert_close(side, b[:, 2])


def test_distances_round_trip():
    g = torch.Generator().manual_seed(9)
    anchors = torch.rand(30, 2, generator=g, dtype=D) * 20
    dist = torch.rand(30, 4, generator=g, dtype=D) * 5
    ang = torch.rand(30, 1, generator=g, dtype=D) * 3 - 1
    box = F.dist_to_rbox(dist, ang, anchor_points=anchors)
    back = F.rbox_to_dist(torch.cat((box, ang), 1), anchor_points=anchors)
    torch.testing.assert_close(back, dist)
    torch.testing.assert_close(F.rbox_to_dist(torch.cat((box, ang), 1), anchor_points=anchors, max_dist=2.0), dist.clamp(0, 2.0))
    # with angle 0 the box is the axis-aligned one of the distances
    box0 = F.dist_to_rbox(dist, torch.zeros_like(ang), anchor_points=anchors)
    x1y1, x2y2 = anchors - dist[:, :2], anchors + dist[:, 2:]
    torch.testing.assert_close(box0, torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1))


def test_angle_loss():
    g = torch.Generator().manual_seed(10)
    p = torch.rand(40, generator=g, dtype=D) * 6 - 3
    t = torch.rand(40, generator=g, dtype=D) * 1.5
    wh = torch.rand(40, 2, generator=g, dtype=D) * 10 + 0.1
    loss = F.rotated_angle_loss(p, t, target_wh=wh)
    expected = torch.exp(-torch.log(wh[:, 0] / wh[:, 1]) ** 2 / 9) * torch.sin(2 * (p - t)) ** 2
    torch.testing.assert_close(loss, expected, rtol=1e-7, atol=1e-12)
    torch.testing.assert_close(F.rotated_angle_loss(p + math.pi, t, target_wh=wh), loss, rtol=1e-7, atol=1e-12)
    assert float(F.rotated_angle_loss(t, t, target_wh=wh).abs().max()) < 1e-20
    sq = torch.ones(40, 2, dtype=D)
    torch.testing.assert_close(F.rotated_angle_loss(p, t, target_wh=sq), torch.sin(2 * (p - t)) ** 2, rtol=1e-7, atol=1e-12)
    w = torch.rand(40, dtype=D)
    torch.testing.assert_close(dnn.RotatedAngleLoss(reduction="sum")(p, t, wh, w), (loss * w).sum())


# ---------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("floor", [0.0, 0.01])
def test_gradcheck_probiou(floor):
    b1 = rboxes(5, seed=11).requires_grad_(True)
    b2 = (rboxes(5, seed=11) + 0.3 * rboxes(5, seed=12)).requires_grad_(True)
    assert gradcheck(lambda a, b: F.probiou(a, b, floor=floor), (b1, b2))


def test_gradcheck_probiou_loss_and_conversions():
    p = rboxes(4, seed=13).requires_grad_(True)
    t = (rboxes(4, seed=13) * 1.1).requires_grad_(True)
    w = torch.rand(4, dtype=D, requires_grad=True)
    assert gradcheck(lambda p, t, w: F.probiou_loss(p, t, weight=w, reduction="sum"), (p, t, w))
    g = torch.Generator().manual_seed(14)
    anchors = (torch.rand(4, 2, generator=g, dtype=D) * 5).requires_grad_(True)
    dist = (torch.rand(4, 4, generator=g, dtype=D) * 5 + 0.1).requires_grad_(True)
    ang = (torch.rand(4, 1, generator=g, dtype=D)).requires_grad_(True)
    assert gradcheck(lambda d, a, p: F.dist_to_rbox(d, a, anchor_points=p), (dist, ang, anchors))
    assert gradcheck(lambda b, p: F.rbox_to_dist(b, anchor_points=p), (p, anchors))
    assert gradcheck(F.xywhr_to_corners, (p,))


def test_gradcheck_angle_loss():
    g = torch.Generator().manual_seed(15)
    p = (torch.rand(6, generator=g, dtype=D) * 3).requires_grad_(True)
    t = (torch.rand(6, generator=g, dtype=D)).requires_grad_(True)
    wh = (torch.rand(6, 2, generator=g, dtype=D) * 4 + 0.5).requires_grad_(True)
    assert gradcheck(lambda p, t, wh: F.rotated_angle_loss(p, t, target_wh=wh, reduction="mean"), (p, t, wh))


def test_degenerate_boxes_give_finite_gradients():
    b1 = torch.tensor([[5.0, 5.0, 0.0, 0.0, 0.3], [1.0, 2.0, 0.0, 4.0, 0.0]], dtype=D, requires_grad=True)
    b2 = torch.tensor([[5.0, 5.0, 0.0, 0.0, 0.3], [1.5, 2.0, 3.0, 0.0, 1.0]], dtype=D, requires_grad=True)
    for floor in (0.0, 0.01):
        out = F.probiou(b1, b2, floor=floor)
        assert torch.isfinite(out).all()
        ga, gb = torch.autograd.grad(out.sum(), (b1, b2))
        assert torch.isfinite(ga).all() and torch.isfinite(gb).all()


# ---------------------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    n=st.integers(0, 6),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    seed=st.integers(0, 2 ** 16),
)
def test_properties_probiou_and_angle(dtype, n, scale, seed):
    g = torch.Generator().manual_seed(seed)
    b = torch.rand(2, n, 5, generator=g, dtype=D) * torch.tensor([scale, scale, scale, scale, 6.0], dtype=D)
    b[..., 4] -= 3
    b1, b2 = (x.to(dtype).requires_grad_(True) for x in b)
    out = F.probiou_loss(b1, b2, reduction="none")
    ang = F.rotated_angle_loss(b1[:, 4], b2[:, 4], target_wh=b2[:, 2:4].detach(), reduction="sum")
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == want and ang.dtype == want and out.shape == (n,)
    assert torch.isfinite(out).all() and torch.isfinite(ang)
    assert ((out >= 0) & (out <= 1 + 1e-7)).all()  # 1 - ProbIoU is at most sqrt(1 + eps)
    g1, g2 = torch.autograd.grad(out.sum() + ang, (b1, b2))
    assert g1.dtype == dtype and g2.dtype == dtype
    assert not torch.isnan(g1).any() and not torch.isnan(g2).any()


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input():
    good = rboxes(3)
    with pytest.raises(ValueError, match=r"boxes1: expected rotated boxes of shape \[\.\.\., 5\].*\(3, 4\)"):
        F.probiou(good[:, :4], good)
    with pytest.raises(ValueError, match=r"boxes2: expected the same shape as boxes1 \(3, 5\), got \(2, 5\)"):
        F.probiou(good, good[:2])
    bad = good.clone()
    bad[1, 3] = -1.0
    with pytest.raises(ValueError, match=r"target: expected finite rotated boxes with w >= 0 and h >= 0.*row \(1,\)"):
        F.probiou_loss(good, bad)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="boxes2: expected finite"):
        F.probiou(good, bad)
    with pytest.raises(TypeError, match="boxes1: expected a floating-point tensor"):
        F.probiou(good.long(), good)
    with pytest.raises(ValueError, match="floor: expected a number >= 0"):
        F.probiou(good, good, floor=-1.0)
    with pytest.raises(ValueError, match=r"weight: expected a shape broadcastable to the loss \(3,\), got \(4,\)"):
        F.probiou_loss(good, good, weight=torch.ones(4, dtype=D))
    with pytest.raises(ValueError, match=r"target_wh: expected shape \(3, 2\)"):
        F.rotated_angle_loss(good[:, 4], good[:, 4], target_wh=good[:, 2:5])
    with pytest.raises(ValueError, match=r"target_wh: expected target sides in \[0.0, inf\], got -1"):
        F.rotated_angle_loss(good[:, 4], good[:, 4], target_wh=-torch.ones(3, 2, dtype=D))
    with pytest.raises(ValueError, match=r"target_angle: expected the same shape as pred_angle"):
        F.rotated_angle_loss(good[:, 4], good[:2, 4], target_wh=good[:, 2:4])
    with pytest.raises(ValueError, match="reduction"):
        F.probiou_loss(good, good, reduction="avg")
