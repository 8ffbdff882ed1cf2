"""Keypoints: OKS similarity and keypoint loss against the COCO formula written out, the RealNVP
log-density against the change-of-variables formula (autograd Jacobian) and its normalization,
RLE against its formula, gradcheck, properties and bad input.

The oracle comparison with ultralytics' ``KeypointLoss`` / ``RealNVP`` / ``RLELoss`` lives in
integration_tests/test_ultralytics_task_pieces.py; the pose losses are checked against the
ultralytics 8.4.190 reference cases in tests/losses/test_pose*.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import detloss.functional as F
import detloss.nn as dnn
from detloss.functional.keypoints import COCO_KEYPOINT_SIGMAS, COCO_RLE_WEIGHTS

D = torch.float64


def kpts(n, k, seed=0, d=3):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, k, d, generator=g, dtype=D) * 10


def random_flow(seed=0, scale=0.4):
    torch.manual_seed(seed)
    flow = dnn.RealNVP().double()
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(torch.randn_like(p) * scale)
    return flow


def test_coco_constants():
    assert COCO_KEYPOINT_SIGMAS.dtype == torch.float32 and COCO_KEYPOINT_SIGMAS.shape == (17,)
    torch.testing.assert_close(COCO_KEYPOINT_SIGMAS[[0, 5, 11]].double(), torch.tensor([0.026, 0.079, 0.107], dtype=D))
    assert COCO_RLE_WEIGHTS.shape == (17,) and float(COCO_RLE_WEIGHTS.max()) == 1.5


def test_similarity_and_oks_follow_cocoeval():
    p, t = kpts(5, 4, seed=1), kpts(5, 4, seed=2)
    area = torch.rand(5, dtype=D) * 30 + 1
    sig = torch.tensor([0.03, 0.06, 0.09, 0.12], dtype=D)
    vis = torch.tensor([[1, 1, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [0, 1, 1, 0]], dtype=torch.bool)
    sim = F.keypoint_similarity(p, t, area=area, sigmas=sig)
    for n in range(5):
        for k in range(4):
            d2 = float(((p[n, k, :2] - t[n, k, :2]) ** 2).sum())
            kk = 2 * float(sig[k])
            assert math.isclose(float(sim[n, k]), math.exp(-d2 / (2 * (float(area[n]) + 1e-9) * kk * kk)), rel_tol=1e-12)
    oks = F.object_keypoint_similarity(p, t, visible=vis, area=area[:, None], sigmas=sig)
    for n in range(5):
        v = vis[n]
        expected = float(sim[n][v].sum()) / max(int(v.sum()), 1)
        assert math.isclose(float(oks[n]), expected, rel_tol=1e-12, abs_tol=1e-300)
    assert float(oks[1]) == 0.0
    same = F.object_keypoint_similarity(p, p, visible=vis, area=area, sigmas=sig)
    torch.testing.assert_close(same, (vis.sum(1) > 0).to(D))


def test_keypoint_loss_is_the_visibility_normalized_oks_loss():
    p, t = kpts(6, 17, seed=3), kpts(6, 17, seed=4)
    area = torch.rand(6, 1, dtype=D) * 50
    vis = torch.rand(6, 17, generator=torch.Generator().manual_seed(5)) > 0.4
    vis[2] = False
    sig = COCO_KEYPOINT_SIGMAS
    sim = F.keypoint_similarity(p, t, area=area, sigmas=sig)
    per = (17 / (vis.sum(1, keepdim=True) + 1e-9)) * (1 - sim) * vis
    torch.testing.assert_close(F.keypoint_loss(p, t, visible=vis, area=area, sigmas=sig, reduction="none"), per)
    torch.testing.assert_close(F.keypoint_loss(p, t, visible=vis, area=area, sigmas=sig), per.mean())
    torch.testing.assert_close(dnn.KeypointLoss()(p, t, vis, area), per.mean())
    assert float(F.keypoint_loss(t, t, visible=vis, area=area, sigmas=sig, reduction="sum")) == 0.0


def test_realnvp_identity_flow_is_the_standard_normal():
    flow = dnn.RealNVP().double()
    with torch.no_grad():
        for p in flow.parameters():
            p.zero_()
    x = torch.randn(10, 2, dtype=D) * 3
    torch.testing.assert_close(flow.log_prob(x), -0.5 * (x ** 2).sum(1) - math.log(2 * math.pi))


def test_realnvp_change_of_variables():
    """log p(x) = log N(z(x); 0, I) + log |det dz/dx|, with the Jacobian from autograd."""
    flow = random_flow(seed=1)
    state = {**dict(flow.named_parameters()), "mask": flow.mask}

    def latent(x):  # z(x) recovered from log_prob's pieces: rerun the layers
        z = x
        for i in reversed(range(6)):
            m = flow.mask[i]
            keep = m * z
            s = flow.s[i](keep) * (1 - m)
            t = flow.t[i](keep) * (1 - m)
            z = (1 - m) * (z - t) * torch.exp(-s) + keep
        return z

    for x in torch.randn(5, 2, dtype=D, generator=torch.Generator().manual_seed(2)):
        jac = torch.autograd.functional.jacobian(lambda v: latent(v[None])[0], x)
        z = latent(x[None])[0]
        z, jac = z.detach(), jac.detach()
        expected = -0.5 * float((z ** 2).sum()) - math.log(2 * math.pi) + math.log(abs(float(torch.linalg.det(jac))))
        assert math.isclose(float(F.realnvp_log_prob(x[None], state)[0].detach()), expected, rel_tol=1e-10)


def test_realnvp_density_integrates_to_one():
    flow = random_flow(seed=3, scale=0.2)
    n, half = 801, 16.0
    xs = torch.linspace(-half, half, n, dtype=D)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="ij"), -1).view(-1, 2)
    with torch.no_grad():
        mass = flow.log_prob(grid).exp().sum() * (xs[1] - xs[0]) ** 2
    assert abs(float(mass) - 1.0) < 1e-3


def test_realnvp_float32_square_option_and_state_names():
    flow = random_flow(seed=4)
    x = torch.randn(20, 2, dtype=D) * 4
    a = flow.log_prob(x)
    flow.square_in_float32 = True
    b = flow.log_prob(x)
    assert b.dtype == D
    torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    names = set(flow.state_dict())
    assert {"loc", "cov", "mask", "s.0.0.weight", "s.5.4.bias", "t.3.2.weight"} <= names and len(names) == 75


def test_rle_loss_formula():
    flow = random_flow(seed=5)
    g = torch.Generator().manual_seed(6)
    p, t = torch.randn(8, 2, generator=g, dtype=D) * 3, torch.randn(8, 2, generator=g, dtype=D) * 3
    logit = torch.randn(8, 2, generator=g, dtype=D) * 2
    w = torch.rand(8, generator=g, dtype=D) + 0.5
    sigma = logit.sigmoid()
    e = ((p - t) / (sigma + 1e-9)).clamp(-100, 100)
    log_phi = flow.log_prob(e)
    per = (torch.log(sigma) - log_phi[:, None] + torch.log(2 * sigma) + e.abs()).sum(1) * w
    torch.testing.assert_close(F.rle_loss(p, t, sigma_logit=logit, log_prob=flow.log_prob, weight=w, reduction="none"), per)
    torch.testing.assert_close(F.rle_loss(p, t, sigma_logit=logit, log_prob=flow.log_prob, weight=w), per.mean())
    no_res = (torch.log(sigma) - log_phi[:, None]).sum(1)
    torch.testing.assert_close(F.rle_loss(p, t, sigma_logit=logit, log_prob=flow.log_prob, residual=False, reduction="sum"), no_res.sum())
    torch.testing.assert_close(dnn.RLELoss(flow=flow)(p, t, logit, w), per.mean())
    # the error is clamped to +-100: a huge miss saturates
    far = F.rle_loss(p + 1e6, t, sigma_logit=logit, log_prob=flow.log_prob, reduction="none")
    e_far = torch.full_like(e, 100.0)
    torch.testing.assert_close(far, (torch.log(sigma) - flow.log_prob(e_far)[:, None] + torch.log(2 * sigma) + 100).sum(1))


# ---------------------------------------------------------------------------------------- gradcheck
def test_gradcheck_keypoint_pieces():
    p = kpts(3, 4, seed=7).requires_grad_(True)
    t = (kpts(3, 4, seed=7) + 0.5).requires_grad_(True)
    area = (torch.rand(3, dtype=D) * 5 + 1).requires_grad_(True)
    sig = torch.tensor([0.3, 0.6, 0.9, 1.2], dtype=D, requires_grad=True)
    vis = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    assert gradcheck(lambda p, t, a, s: F.keypoint_similarity(p, t, area=a, sigmas=s), (p, t, area, sig))
    assert gradcheck(lambda p, t, a, s: F.object_keypoint_similarity(p, t, visible=vis, area=a, sigmas=s), (p, t, area, sig))
    assert gradcheck(lambda p, t, a, s: F.keypoint_loss(p, t, visible=vis, area=a, sigmas=s), (p, t, area, sig))


def test_gradcheck_realnvp_and_rle():
    flow = random_flow(seed=8)
    x = torch.randn(4, 2, dtype=D).requires_grad_(True)  # moderate log-densities: finite differences stay well inside the tolerance
    params = [flow.s[0][0].weight, flow.t[5][4].bias, flow.s[3][4].weight]

    def f(x, *ps):
        state = {**dict(flow.named_parameters()), "mask": flow.mask}
        state.update({"s.0.0.weight": ps[0], "t.5.4.bias": ps[1], "s.3.4.weight": ps[2]})
        return F.realnvp_log_prob(x, state)

    assert gradcheck(f, (x, *[q.detach().clone().requires_grad_(True) for q in params]))
    g = torch.Generator().manual_seed(9)
    p = (torch.randn(5, 2, generator=g, dtype=D)).requires_grad_(True)
    t = torch.randn(5, 2, generator=g, dtype=D).requires_grad_(True)
    logit = torch.randn(5, 2, generator=g, dtype=D).requires_grad_(True)
    w = (torch.rand(5, generator=g, dtype=D) + 0.5).requires_grad_(True)
    assert gradcheck(lambda p, t, s, w: F.rle_loss(p, t, sigma_logit=s, log_prob=flow.log_prob, weight=w), (p, t, logit, w))


# ---------------------------------------------------------------------------------------- properties
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    n=st.integers(0, 5),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    logit=st.sampled_from([0.0, 80.0, -80.0, 1e4, -1e4]),
    seed=st.integers(0, 2 ** 16),
)
def test_properties(dtype, n, scale, logit, seed):
    g = torch.Generator().manual_seed(seed)
    p = (torch.rand(n, 5, 2, generator=g, dtype=D) * scale).to(dtype).requires_grad_(True)
    t = (torch.rand(n, 5, 2, generator=g, dtype=D) * scale).to(dtype)
    area = (torch.rand(n, generator=g, dtype=D) * scale).to(dtype)
    area[:1] = 0  # zero-area objects
    vis = torch.rand(n, 5, generator=g) > 0.3
    sig = torch.full((5,), 0.05)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    kl = F.keypoint_loss(p, t, visible=vis, area=area, sigmas=sig)
    flow = dnn.RealNVP()
    s = torch.full((n * 5, 2), logit, dtype=dtype, requires_grad=True)
    rle = F.rle_loss(p.reshape(-1, 2), t.reshape(-1, 2), sigma_logit=s, log_prob=flow.log_prob)
    for out in (kl, rle):
        assert out.dtype == want and torch.isfinite(out)
    gp, gs = torch.autograd.grad(kl + rle, (p, s))
    assert gp.dtype == dtype and gs.dtype == dtype
    assert not torch.isnan(gp).any() and not torch.isnan(gs).any()


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input():
    p, t = kpts(3, 4), kpts(3, 4)
    area = torch.ones(3, dtype=D)
    vis = torch.ones(3, 4, dtype=torch.bool)
    sig = torch.full((4,), 0.1, dtype=D)
    with pytest.raises(ValueError, match=r"target: expected keypoints of shape \(3, 4, 'D >= 2'\) like pred, got \(3, 5, 3\)"):
        F.keypoint_loss(p, kpts(3, 5), visible=vis, area=area, sigmas=sig)
    with pytest.raises(ValueError, match=r"pred: expected keypoints of shape \[\.\.\., K, D\] with D >= 2"):
        F.keypoint_loss(p[..., :1], t[..., :1], visible=vis, area=area, sigmas=sig)
    with pytest.raises(ValueError, match=r"sigmas: expected one per keypoint, shape \(4,\), got \(17,\)"):
        F.keypoint_loss(p, t, visible=vis, area=area, sigmas=COCO_KEYPOINT_SIGMAS)
    with pytest.raises(ValueError, match="sigmas: expected positive values"):
        F.keypoint_loss(p, t, visible=vis, area=area, sigmas=torch.zeros(4))
    with pytest.raises(ValueError, match=r"visible: expected shape \(3, 4\) \(one flag per keypoint\), got \(3, 3\)"):
        F.keypoint_loss(p, t, visible=vis[:, :3], area=area, sigmas=sig)
    with pytest.raises(ValueError, match=r"area: expected shape \(3,\) or \(3, 1\)"):
        F.keypoint_loss(p, t, visible=vis, area=torch.ones(4, dtype=D), sigmas=sig)
    with pytest.raises(ValueError, match=r"area: expected object areas in \[0.0, inf\], got -1"):
        F.keypoint_loss(p, t, visible=vis, area=-area, sigmas=sig)
    flow = dnn.RealNVP().double()
    with pytest.raises(ValueError, match=r"x: expected points of shape \[N, 2\], got \(3, 3\)"):
        flow.log_prob(torch.zeros(3, 3, dtype=D))
    with pytest.raises(ValueError, match="state: expected a RealNVP state"):
        F.realnvp_log_prob(torch.zeros(3, 2), {})
    with pytest.raises(ValueError, match=r"sigma_logit: expected shape \[3, 2\]"):
        F.rle_loss(p[:, 0, :2], t[:, 0, :2], sigma_logit=torch.zeros(3, 4, dtype=D), log_prob=flow.log_prob)
    with pytest.raises(ValueError, match=r"weight: expected shape \(3,\) \(one per keypoint\)"):
        F.rle_loss(p[:, 0, :2], t[:, 0, :2], sigma_logit=torch.zeros(3, 2, dtype=D), log_prob=flow.log_prob, weight=torch.ones(2))
    with pytest.raises(ValueError, match=r"log_prob: expected a callable returning shape \(3,\), got \(3, 2\)"):
        F.rle_loss(p[:, 0, :2], t[:, 0, :2], sigma_logit=torch.zeros(3, 2, dtype=D), log_prob=lambda e: e)
    with pytest.raises(ValueError, match="num_layers"):
        dnn.RealNVP(num_layers=0)
