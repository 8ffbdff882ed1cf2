"""Parity with torch.nn.functional (the definition these losses follow), values and gradients."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import detloss.functional as F

REDUCTIONS = ["none", "mean", "sum"]


def grads(fn, *xs):
    leaves = [x.detach().clone().requires_grad_(True) for x in xs]
    out = fn(*leaves)
    return out.detach(), torch.autograd.grad(out.sum(), leaves)


def check(ours, theirs, *xs, rtol=1e-6, atol=1e-12):
    v1, g1 = grads(ours, *xs)
    v2, g2 = grads(theirs, *xs)
    assert v1.dtype == v2.dtype
    torch.testing.assert_close(v1, v2, rtol=rtol, atol=atol)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


def logits(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=dtype) * 8
    flat = x.view(-1)
    extremes = torch.tensor([1e4, -1e4, 0.0, 60.0, -60.0, 1e-3, -20.0, 35.0], dtype=dtype)
    flat[: len(extremes)] = extremes[: flat.numel()]
    return x


# ------------------------------------------------------------------ BCE with logits
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_weight", [False, True])
@pytest.mark.parametrize("pos_weight_shape", [None, (5,), (1,), (4, 5), (3, 4, 1)])
def test_bce_with_logits(dtype, reduction, with_weight, pos_weight_shape):
    g = torch.Generator().manual_seed(1)
    x = logits((3, 4, 5), dtype)
    y = torch.rand(3, 4, 5, generator=g, dtype=dtype)
    y[0, 0, :3] = torch.tensor([0.0, 1.0, 0.5], dtype=dtype)
    w = torch.rand(4, 1, generator=g, dtype=dtype) if with_weight else None
    pw = None if pos_weight_shape is None else torch.rand(pos_weight_shape, generator=g, dtype=dtype) * 4
    # value: identical expression to torch's, so it matches to the last bit; gradients to rounding
    check(
        lambda a, b: F.bce_with_logits(a, b, weight=w, pos_weight=pw, reduction=reduction),
        lambda a, b: TF.binary_cross_entropy_with_logits(a, b, weight=w, pos_weight=pw, reduction=reduction),
        x, y,
        rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-12,
    )


def test_bce_with_logits_huge_logits_finite_and_exact():
    x = torch.tensor([1e4, -1e4, 1e4, -1e4, 3e38, -3e38])
    y = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.3, 0.7])
    ours = F.bce_with_logits(x, y, reduction="none")
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, TF.binary_cross_entropy_with_logits(x, y, reduction="none"), rtol=1e-6, atol=0)


def test_bce_with_logits_tiny_gradients_are_exact():
    # where the true gradient is sigmoid(-60) ~ 8.8e-27 it must not cancel to 0
    x = torch.tensor([-60.0, -30.0, 60.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    F.bce_with_logits(x, y, reduction="sum").backward()
    expected = torch.tensor([torch.sigmoid(torch.tensor(-60.0, dtype=torch.float64)),
                             torch.sigmoid(torch.tensor(-30.0, dtype=torch.float64)),
                             -torch.sigmoid(torch.tensor(-60.0, dtype=torch.float64))])
    torch.testing.assert_close(x.grad, expected, rtol=1e-12, atol=0)


# ------------------------------------------------------------------ BCE on probabilities
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("with_weight", [False, True])
def test_binary_cross_entropy(reduction, with_weight):
    g = torch.Generator().manual_seed(2)
    p = torch.rand(6, 7, generator=g, dtype=torch.float64)
    p[0, :4] = torch.tensor([0.0, 1.0, 1e-50, 1 - 1e-16], dtype=torch.float64)
    y = torch.rand(6, 7, generator=g, dtype=torch.float64)
    w = torch.rand(7, generator=g, dtype=torch.float64) if with_weight else None
    check(lambda a, b: F.binary_cross_entropy(a, b, weight=w, reduction=reduction),
          lambda a, b: TF.binary_cross_entropy(a, b, weight=w, reduction=reduction), p, y)


def test_binary_cross_entropy_log_clamp():
    out = F.binary_cross_entropy(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 0.0]), reduction="none")
    torch.testing.assert_close(out, torch.tensor([100.0, 100.0]))


# ------------------------------------------------------------------ cross-entropy
CE_CASES = [
    dict(shape=(5, 4), weight=False, ignore=False, ls=0.0),
    dict(shape=(5, 4), weight=True, ignore=True, ls=0.0),
    dict(shape=(5, 4), weight=True, ignore=True, ls=0.2),
    dict(shape=(5, 4), weight=False, ignore=True, ls=0.3),
    dict(shape=(2, 3, 4, 5), weight=True, ignore=True, ls=0.1),
    dict(shape=(2, 3, 6), weight=False, ignore=False, ls=0.0),
    dict(shape=(4,), weight=True, ignore=False, ls=0.1),
]


@pytest.mark.parametrize("case", CE_CASES, ids=lambda c: f"{c['shape']}-w{c['weight']}-i{c['ignore']}-ls{c['ls']}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_indices(case, reduction):
    g = torch.Generator().manual_seed(3)
    shape = case["shape"]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    cdim = 0 if len(shape) == 1 else 1
    C = shape[cdim]
    tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
    t = torch.randint(0, C, tshape, generator=g)
    if case["ignore"]:
        t.view(-1)[::3] = 7  # custom ignore_index, not every entry
    w = torch.rand(C, generator=g, dtype=torch.float64) + 0.1 if case["weight"] else None
    kw = dict(weight=w, ignore_index=7, label_smoothing=case["ls"], reduction=reduction)
    check(lambda a: F.cross_entropy(a, t, **kw), lambda a: TF.cross_entropy(a, t, **kw), x)


@pytest.mark.parametrize("shape", [(5, 4), (2, 3, 4, 5), (4,)])
@pytest.mark.parametrize("weight", [False, True])
@pytest.mark.parametrize("ls", [0.0, 0.25])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_probabilities(shape, weight, ls, reduction):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    cdim = 0 if len(shape) == 1 else 1
    q = torch.softmax(torch.randn(shape, generator=g, dtype=torch.float64), dim=cdim)
    w = torch.rand(shape[cdim], generator=g, dtype=torch.float64) if weight else None
    kw = dict(weight=w, label_smoothing=ls, reduction=reduction)
    check(lambda a, b: F.cross_entropy(a, b, **kw), lambda a, b: TF.cross_entropy(a, b, **kw), x, q)


def test_cross_entropy_all_ignored_mean_is_zero_not_nan():
    x = torch.randn(3, 4, requires_grad=True)
    out = F.cross_entropy(x, torch.full((3,), -100))
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_cross_entropy_int32_targets():
    x = torch.randn(5, 3, dtype=torch.float64)
    t = torch.tensor([0, 2, 1, 1, 0])
    torch.testing.assert_close(F.cross_entropy(x, t.int()), TF.cross_entropy(x, t))


# ------------------------------------------------------------------ regression
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smooth_l1(beta, reduction):
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(2, 50, generator=g, dtype=torch.float64) * 2
    x[:3] = y[:3] + torch.tensor([0.0, beta, -beta], dtype=torch.float64)  # kinks
    check(lambda a, b: F.smooth_l1_loss(a, b, beta=beta, reduction=reduction),
          lambda a, b: TF.smooth_l1_loss(a, b, beta=beta, reduction=reduction), x, y)


@pytest.mark.parametrize("name", ["l1_loss", "mse_loss"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_l1_mse(name, reduction):
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    x[0, 0] = y[0, 0]
    check(lambda a, b: getattr(F, name)(a, b, reduction=reduction),
          lambda a, b: getattr(TF, name)(a, b, reduction=reduction), x, y)


# ------------------------------------------------------------------ softmax focal == CE at gamma 0
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_focal_reduces_to_cross_entropy(reduction):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (6, 3), generator=g)
    t[0, 0] = -100
    w = torch.rand(5, generator=g, dtype=torch.float64) + 0.1
    check(lambda a: F.softmax_focal_loss(a, t, weight=w, alpha=1.0, gamma=0.0, reduction=reduction),
          lambda a: TF.cross_entropy(a, t, weight=w, reduction=reduction), x)


def test_softmax_focal_formula():
    x = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]], dtype=torch.float64)
    t = torch.tensor([0, 2])
    p = torch.softmax(x, 1)[torch.arange(2), t]
    expected = -0.25 * (1 - p) ** 2 * torch.log(p)
    torch.testing.assert_close(F.softmax_focal_loss(x, t, reduction="none"), expected)
