"""Fused dense losses (eager closed-form pass) against the plain autograd formulas of
detloss.functional, the ground truth: values and gradients for every reduction and option,
float64 to 1e-10, float32 to rounding, half precision computed in float32; gradcheck in float64;
no NaN/inf for extreme logits (hypothesis)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _kernel_helpers import assert_parity, bce_formula, blur_formula, focal_formula, loss_and_grad, qfl_formula, vfl_formula
from detloss import kernels

REDUCTIONS = ("none", "mean", "sum")
GAMMAS = (0.0, 1.5, 2.0, 3.0)


def _inputs(shape, dtype=torch.float64, seed=0, soft=False, extreme=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    if extreme:
        flat = x.view(-1)
        flat[:6] = torch.tensor([1e4, -1e4, 0.0, 40.0, -40.0, 1e-3], dtype=torch.float64)
    t = torch.rand(shape, generator=g, dtype=torch.float64)
    if not soft:
        t = (t > 0.8).to(torch.float64)
    else:
        t.view(-1)[:6] = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0], dtype=torch.float64)
    return x.to(dtype), t.to(dtype)


def _losses(t, label=None):
    """(name, fused(x), formula(x)) for every dense loss with one configuration each."""
    lab = (t > 0.5).to(t.dtype) if label is None else label
    score = t * lab
    c = t.shape[-1]  # weights exactly representable in half precision
    pw = (0.5 + 0.25 * torch.arange(c, dtype=torch.float64)).to(t.dtype)
    w = (torch.arange(c, 0, -1, dtype=torch.float64) / 8).to(t.dtype)
    return [
        ("bce", lambda r: (lambda x: kernels.fused_bce_with_logits(x, t, reduction=r)),
         lambda r: (lambda x: bce_formula(x, t, reduction=r))),
        ("bce_w_pw", lambda r: (lambda x: kernels.fused_bce_with_logits(x, t, w, pw, r)),
         lambda r: (lambda x: bce_formula(x, t, w, pw, r))),
        ("focal", lambda r: (lambda x: kernels.fused_sigmoid_focal_loss(x, t, 0.25, 2.0, r)),
         lambda r: (lambda x: focal_formula(x, t, 0.25, 2.0, r))),
        ("focal_pw", lambda r: (lambda x: kernels.fused_sigmoid_focal_loss(x, t, 0.25, 1.5, r, pw)),
         lambda r: (lambda x: focal_formula(x, t, 0.25, 1.5, r, pw))),
        ("qfl", lambda r: (lambda x: kernels.fused_quality_focal_loss(x, t, 2.0, None, r)),
         lambda r: (lambda x: qfl_formula(x, t, 2.0, None, r))),
        ("vfl", lambda r: (lambda x: kernels.fused_varifocal_loss(x, score, lab, 0.75, 2.0, r)),
         lambda r: (lambda x: vfl_formula(x, score, lab, 0.75, 2.0, r))),
        ("blur", lambda r: (lambda x: kernels.fused_bce_blur(x, t, 0.05, r)),
         lambda r: (lambda x: blur_formula(x, t, 0.05, r))),
    ]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("shape", [(37, 5), (2, 17, 6), (50,)])
@pytest.mark.parametrize("soft", [False, True])
def test_every_loss_matches_formula_float64(eager, reduction, shape, soft):
    x, t = _inputs(shape, soft=soft)
    go = torch.rand(shape, dtype=torch.float64) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    for name, fused, formula in _losses(t):
        try:
            assert_parity(fused(reduction), formula(reduction), x, go)
        except AssertionError as e:
            raise AssertionError(f"{name}: {e}") from None


@pytest.mark.parametrize("gamma", GAMMAS + (1.0, 0.5, 2.5))
@pytest.mark.parametrize("alpha", [0.25, 0.6, -1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_gamma_alpha(eager, gamma, alpha, reduction):
    x, t = _inputs((40, 7), soft=True, seed=2)
    assert_parity(
        lambda a: kernels.fused_sigmoid_focal_loss(a, t, alpha, gamma, reduction),
        lambda a: focal_formula(a, t, alpha, gamma, reduction),
        x,
    )


@pytest.mark.parametrize("gamma", GAMMAS + (0.5,))
@pytest.mark.parametrize("alpha", [None, 0.25])
def test_quality_focal_gamma_alpha(eager, gamma, alpha):
    x, t = _inputs((40, 7), soft=True, seed=3)
    assert_parity(
        lambda a: kernels.fused_quality_focal_loss(a, t, gamma, alpha, "sum"),
        lambda a: qfl_formula(a, t, gamma, alpha, "sum"),
        x,
    )


@pytest.mark.parametrize("gamma", GAMMAS + (0.5,))
@pytest.mark.parametrize("alpha", [0.75, 0.25])
def test_varifocal_gamma_alpha(eager, gamma, alpha):
    x, t = _inputs((40, 7), soft=True, seed=4)
    lab = (t > 0.6).double()
    assert_parity(
        lambda a: kernels.fused_varifocal_loss(a, t * lab, lab, alpha, gamma, "mean"),
        lambda a: vfl_formula(a, t * lab, lab, alpha, gamma, "mean"),
        x,
    )


@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_bce_blur_alpha(eager, alpha):
    x, t = _inputs((40, 7), soft=True, seed=5)
    assert_parity(
        lambda a: kernels.fused_bce_blur(a, t, alpha, "mean"),
        lambda a: blur_formula(a, t, alpha, "mean"),
        x,
    )


@pytest.mark.parametrize(
    "w_shape,pw_shape", [((8,), None), (None, (8,)), ((5, 8), (8,)), ((5, 1), (1,)), ((), None)]
)
def test_bce_weight_and_pos_weight_broadcasting(eager, w_shape, pw_shape):
    x, t = _inputs((5, 8), soft=True, seed=6)
    w = None if w_shape is None else torch.rand(w_shape, dtype=torch.float64)
    pw = None if pw_shape is None else torch.rand(pw_shape, dtype=torch.float64) * 4
    for r in REDUCTIONS:
        assert_parity(
            lambda a: kernels.fused_bce_with_logits(a, t, w, pw, r),
            lambda a: bce_formula(a, t, w, pw, r),
            x,
        )


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_float32_matches_formula_to_rounding(eager, reduction):
    """Values against the float32 formula; gradients against the formula on the same values in
    float64 (the float32 formula's own gradient is less accurate: its BCE part (1 - y) - sigmoid(-x)
    cancels, which the closed form avoids)."""
    x, t = _inputs((300, 20), dtype=torch.float32, soft=True, seed=7)
    for (name, fused, formula), (_, _, formula64) in zip(_losses(t), _losses(t.double())):
        lf, gf = loss_and_grad(fused(reduction), x)
        lr, _ = loss_and_grad(formula(reduction), x)
        _, gr = loss_and_grad(formula64(reduction), x.double())
        assert lf.dtype == gf.dtype == torch.float32, name
        torch.testing.assert_close(lf, lr, rtol=2e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(gf, gr.float(), rtol=2e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_half_inputs_computed_in_float32(eager, dtype, reduction):
    x, t = _inputs((64, 10), dtype=torch.float32, soft=True, seed=8, extreme=False)
    xh, th = x.to(dtype), t.to(dtype)
    tol = dict(rtol=1e-2, atol=1e-3) if dtype == torch.bfloat16 else dict(rtol=2e-3, atol=1e-4)
    # ground truth: the formula on the same half values upcast to float32
    for (name, fused, _), (_, _, formula) in zip(_losses(th), _losses(th.float())):
        lf, gf = loss_and_grad(fused(reduction), xh)
        lr, gr = loss_and_grad(lambda a: formula(reduction)(a.float()), xh)
        assert lf.dtype == torch.float32 and gf.dtype == dtype, name
        torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(gf.float(), gr.float(), **tol, msg=name)


def test_half_gradient_scaled_before_cast(eager):
    """A large upstream scale (AMP's loss scaler) multiplies the float32 gradient before the cast
    to float16, so small gradients survive as in the formula instead of flushing to zero."""
    x = torch.randn(4096, 64).to(torch.float16)
    t = (torch.rand(4096, 64) > 0.9).to(torch.float16)
    lf, gf = loss_and_grad(lambda a: kernels.fused_sigmoid_focal_loss(a, t, reduction="mean") * 65536.0, x)
    lr, gr = loss_and_grad(lambda a: focal_formula(a.float(), t.float(), reduction="mean") * 65536.0, x)
    assert (gf != 0).sum() == (gr != 0).sum() > 0
    torch.testing.assert_close(gf.float(), gr.float(), rtol=2e-3, atol=1e-6)


def test_gradcheck_float64(eager):
    g = torch.Generator().manual_seed(9)
    x = (torch.randn(6, 5, generator=g, dtype=torch.float64) * 2).requires_grad_()
    t = torch.rand(6, 5, generator=g, dtype=torch.float64)
    lab = (t > 0.5).double()
    w, pw = torch.rand(5, dtype=torch.float64), torch.rand(5, dtype=torch.float64) * 3
    fns = {
        "bce": lambda a: kernels.fused_bce_with_logits(a, t, w, pw, "none"),
        "focal": lambda a: kernels.fused_sigmoid_focal_loss(a, t, 0.25, 1.5, "none"),
        "focal_sum": lambda a: kernels.fused_sigmoid_focal_loss(a, t, -1, 3.0, "sum"),
        "qfl": lambda a: kernels.fused_quality_focal_loss(a, t, 2.0, 0.25, "none"),
        "vfl": lambda a: kernels.fused_varifocal_loss(a, t * lab, lab, 0.75, 2.0, "mean"),
        "blur": lambda a: kernels.fused_bce_blur(a, t, 0.05, "none"),
    }
    for name, fn in fns.items():
        assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7, rtol=1e-5), name


LOGIT = st.one_of(st.floats(-1e4, 1e4, allow_nan=False, width=32), st.sampled_from([1e4, -1e4, 0.0, 88.0, -88.0]))


@settings(max_examples=40, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 5),
    data=st.data(),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    reduction=st.sampled_from(REDUCTIONS),
    gamma=st.sampled_from(GAMMAS),
)
def test_no_nan_or_inf_for_finite_input(rows, cols, data, dtype, reduction, gamma):
    import os

    saved = {k: os.environ.get(k) for k in ("DETLOSS_COMPILE", "DETLOSS_FUSED_MIN_NUMEL", "DETLOSS_FUSED")}
    os.environ.update(DETLOSS_COMPILE="0", DETLOSS_FUSED_MIN_NUMEL="0", DETLOSS_FUSED="1")
    try:
        vals = data.draw(st.lists(LOGIT, min_size=rows * cols, max_size=rows * cols))
        tvals = data.draw(st.lists(st.floats(0, 1), min_size=rows * cols, max_size=rows * cols))
        x = torch.tensor(vals, dtype=torch.float64).view(rows, cols).clamp(-6e4, 6e4).to(dtype)
        t = torch.tensor(tvals, dtype=torch.float64).view(rows, cols).to(dtype)
        lab = (t > 0.5).to(dtype)
        calls = [
            lambda a: kernels.fused_bce_with_logits(a, t, reduction=reduction),
            lambda a: kernels.fused_sigmoid_focal_loss(a, t, 0.25, gamma, reduction),
            lambda a: kernels.fused_quality_focal_loss(a, t, gamma, 0.25, reduction),
            lambda a: kernels.fused_varifocal_loss(a, t * lab, lab, 0.75, gamma, reduction),
            lambda a: kernels.fused_bce_blur(a, t, 0.05, reduction),
        ]
        for fn in calls:
            loss, grad = loss_and_grad(fn, x)
            assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
            assert grad.dtype == dtype
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_log1p_unit_series_within_two_ulp_on_the_unit_interval():
    """The compiled closed forms take log(1 + e^-|x|) from the atanh series of
    ``detloss.kernels.dense._log1p_unit``; against float64 log1p over [0, 1] (a dense log grid
    down to the subnormals, uniform points, the ends) it is within 2 float32 ulps, relatively."""
    from detloss.kernels.dense import _log1p_unit

    e64 = torch.cat([
        torch.logspace(-44, 0, 400001, dtype=torch.float64),
        torch.rand(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64),
        torch.tensor([0.0, 1.0, 0.5, 1e-30], dtype=torch.float64),
    ])
    e = e64.float()
    ref = torch.log1p(e.double())
    got = _log1p_unit(e).double()
    assert torch.equal(got[e == 0], torch.zeros_like(got[e == 0]))
    normal = ref >= torch.finfo(torch.float32).tiny
    rel = ((got - ref).abs() / ref)[normal]
    assert float(rel.max()) <= 2 * torch.finfo(torch.float32).eps
    # below the normal range the result keeps an absolute error of a subnormal ulp
    assert float((got - ref)[~normal & (e > 0)].abs().max()) <= 2 ** -149


def test_plain_gradient_follows_a_transposed_input(eager):
    # a head output (B, C, A) read as [B, A, C]: every plain pass returns its gradient in that
    # layout (so that the head's own gradient is contiguous), with the values of a contiguous input
    # (to an ulp or two: a vectorized kernel's scalar tail falls on other elements)
    xc, t = _inputs((2, 40, 5), dtype=torch.float32, soft=True, seed=9)
    xt = xc.transpose(1, 2).contiguous().transpose(1, 2)  # same values, strides of a (B, C, A) view
    assert not xt.is_contiguous()
    for name, fused, _ in _losses(t):
        lc, gc = loss_and_grad(fused("sum"), xc)
        lt, gt = loss_and_grad(fused("sum"), xt)
        assert gt.stride() == xt.stride(), name
        torch.testing.assert_close(lt, lc, rtol=1e-6, atol=1e-6, msg=name)
        torch.testing.assert_close(gt, gc, rtol=1e-6, atol=1e-30, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compensated_softplus_within_two_ulp(dtype):
    """Where torch's CPU ``log1p`` is scalar (torch 2.14's AVX-512 kernels) the eager closed forms
    take log(1 + e^-|x|) from ``exp`` and a compensated ``log``
    (``detloss.kernels.dense._softplus_abs_compensated``); against float64 ``log1p`` of the same
    ``e`` (from logits over the whole range, subnormal ``e`` included) it is within 2 ulps of
    ``dtype``, relatively, and ``e`` is ``exp(-|x|)`` itself."""
    from detloss.kernels.dense import _softplus_abs, _softplus_abs_compensated

    hi = 103.0 if dtype == torch.float32 else 740.0
    x = torch.cat([
        torch.linspace(-hi, hi, 400001, dtype=torch.float64),
        torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3,
        torch.tensor([0.0, -0.0, 1e-30, -1e-30, 16.6, 17.0, 88.0], dtype=torch.float64),
    ]).to(dtype)
    lsp, e = _softplus_abs_compensated(x)
    assert lsp.dtype == dtype and e.dtype == dtype
    torch.testing.assert_close(e, torch.exp(-x.abs()), rtol=0, atol=0)
    ref = torch.log1p(e.to(torch.float64)) if dtype == torch.float32 else torch.log1p(e)
    tiny = torch.finfo(dtype).tiny
    normal = ref >= tiny
    rel = ((lsp.to(ref.dtype) - ref).abs() / ref)[normal]
    assert float(rel.max()) <= 2 * torch.finfo(dtype).eps
    below = (lsp.to(ref.dtype) - ref)[~normal]  # subnormal results: within a subnormal ulp
    assert below.numel() > 0 and float(below.abs().max()) <= tiny * torch.finfo(dtype).eps
    # the route this machine takes gives the same values to 2 ulps
    lsp2, e2 = _softplus_abs(x)
    torch.testing.assert_close(lsp2, lsp, rtol=2 * torch.finfo(dtype).eps, atol=tiny * torch.finfo(dtype).eps)
