"""Property tests: random shapes (empty included), dtypes float16/bfloat16/float32/float64 and
extreme finite values. No NaN/inf comes out of finite input; half-precision input is computed in
float32 and its gradient comes back in the input dtype."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import detloss.functional as F

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
EXTREMES = [0.0, 1e4, -1e4, 60.0, -60.0, 1e-3, 88.0, -88.0, 1e3]


def shapes(min_dims=1, max_dims=3):
    return hnp.array_shapes(min_dims=min_dims, max_dims=max_dims, min_side=0, max_side=5)


def arr(data, shape, lo, hi, extremes=(), allow_subnormal=True):
    elems = st.floats(lo, hi, allow_nan=False, allow_infinity=False, width=32, allow_subnormal=allow_subnormal)
    if extremes:
        elems = st.one_of(elems, st.sampled_from([e for e in extremes if lo <= e <= hi]))
    return data.draw(hnp.arrays(np.float64, shape, elements=elems))


def tensor(a, dtype, grad=False):
    return torch.tensor(a, dtype=torch.float64).to(dtype).requires_grad_(grad)


def expected_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_and_check(fn, dtype, *leaves):
    out = fn(*leaves)
    assert out.dtype == expected_dtype(dtype), (out.dtype, dtype)
    assert torch.isfinite(out).all(), out
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    for g, x in zip(grads, leaves):
        if g is None:
            continue
        assert g.dtype == x.dtype
        if dtype in (torch.float16, torch.bfloat16):
            assert not torch.isnan(g).any()  # a true gradient beyond the half range may round to inf
        else:
            assert torch.isfinite(g).all(), g


reductions = st.sampled_from(["none", "mean", "sum"])
dtypes = st.sampled_from(DTYPES)


@SETTINGS
@given(data=st.data(), dtype=dtypes, shape=shapes(), reduction=reductions,
       name=st.sampled_from(["bce_with_logits", "bce_pos_weight", "sigmoid_focal_loss", "quality_focal_loss",
                             "bce_blur", "varifocal_loss", "qfl_yolov5", "focal_g05"]))
def test_logit_losses(data, dtype, shape, reduction, name):
    x = tensor(arr(data, shape, -1e4, 1e4, EXTREMES), dtype, grad=True)
    y = tensor(arr(data, shape, 0.0, 1.0, (0.0, 1.0)), dtype)
    if name == "bce_with_logits":
        fn = lambda a: F.bce_with_logits(a, y, reduction=reduction)  # noqa: E731
    elif name == "bce_pos_weight":
        pw = tensor(arr(data, shape[-1:], 0.0, 10.0), dtype)
        fn = lambda a: F.bce_with_logits(a, y, pos_weight=pw, reduction=reduction)  # noqa: E731
    elif name == "sigmoid_focal_loss":
        fn = lambda a: F.sigmoid_focal_loss(a, y, reduction=reduction)  # noqa: E731
    elif name == "focal_g05":
        fn = lambda a: F.sigmoid_focal_loss(a, y, gamma=0.5, reduction=reduction)  # noqa: E731
    elif name == "quality_focal_loss":
        fn = lambda a: F.quality_focal_loss(a, y, reduction=reduction)  # noqa: E731
    elif name == "qfl_yolov5":
        fn = lambda a: F.quality_focal_loss(a, y, gamma=1.5, alpha=0.25, reduction=reduction)  # noqa: E731
    elif name == "bce_blur":
        fn = lambda a: F.bce_blur(a, y, reduction=reduction)  # noqa: E731
    else:
        lab = (y > 0.5).to(dtype)
        fn = lambda a: F.varifocal_loss(a, y, lab, reduction=reduction)  # noqa: E731
    run_and_check(fn, dtype, x)


@SETTINGS
@given(data=st.data(), dtype=dtypes, shape=shapes(), reduction=reductions)
def test_binary_cross_entropy(data, dtype, shape, reduction):
    p = tensor(arr(data, shape, 0.0, 1.0, (0.0, 1.0, 1e-30)), dtype, grad=True)
    y = tensor(arr(data, shape, 0.0, 1.0, (0.0, 1.0)), dtype)
    run_and_check(lambda a: F.binary_cross_entropy(a, y, reduction=reduction), dtype, p)


@SETTINGS
@given(data=st.data(), dtype=dtypes, shape=shapes(1, 4), reduction=reductions,
       ls=st.sampled_from([0.0, 0.1]), soft=st.booleans(), focal=st.booleans())
def test_cross_entropy_and_softmax_focal(data, dtype, shape, reduction, ls, soft, focal):
    if len(shape) == 1:
        shape = (shape[0] or 1,)  # unbatched [C]; C >= 1
    elif shape[1] == 0:
        shape = (shape[0], 1) + tuple(shape[2:])
    x = tensor(arr(data, shape, -1e4, 1e4, EXTREMES), dtype, grad=True)
    cdim = 0 if len(shape) == 1 else 1
    C = shape[cdim]
    if soft and not focal:
        q = torch.softmax(tensor(arr(data, shape, -10, 10), torch.float64), cdim).to(dtype)
        fn = lambda a: F.cross_entropy(a, q, label_smoothing=ls, reduction=reduction)  # noqa: E731
    else:
        tshape = () if len(shape) == 1 else shape[:1] + shape[2:]
        t = torch.tensor(data.draw(hnp.arrays(np.int64, tshape, elements=st.sampled_from(list(range(C)) + [-100]))))
        if focal:
            fn = lambda a: F.softmax_focal_loss(a, t, reduction=reduction)  # noqa: E731
        else:
            fn = lambda a: F.cross_entropy(a, t, label_smoothing=ls, reduction=reduction)  # noqa: E731
    run_and_check(fn, dtype, x)


@SETTINGS
@given(data=st.data(), dtype=dtypes, shape=shapes(), reduction=reductions,
       name=st.sampled_from(["smooth_l1_loss", "l1_loss", "mse_loss"]), beta=st.sampled_from([0.0, 0.5, 1.0]))
def test_regression(data, dtype, shape, reduction, name, beta):
    x = tensor(arr(data, shape, -100, 100, (0.0, 100.0)), dtype, grad=True)
    y = tensor(arr(data, shape, -100, 100, (0.0,)), dtype)
    kw = {"beta": beta} if name == "smooth_l1_loss" else {}
    run_and_check(lambda a: getattr(F, name)(a, y, reduction=reduction, **kw), dtype, x)


@SETTINGS
@given(data=st.data(), dtype=dtypes, n=st.integers(0, 6), reduction=reductions,
       kind=st.sampled_from(["iou", "giou", "diou", "ciou", "eiou", "siou"]),
       convention=st.sampled_from(["torchvision", "yolov5"]), fmt=st.sampled_from(["xyxy", "cxcywh"]),
       boxes=st.none())
# found by hypothesis: a target 1 wide and 2.7e-28 high, whose CIoU gradient in its height is
# -w / (w^2 + h^2) = -1, was NaN (atan(w / h) squared 3.7e27 to inf and h to 0: 0 * inf)
@example(data=None, dtype=torch.float32, n=1, reduction="none", kind="ciou", convention="torchvision",
         fmt="xyxy", boxes=([[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 2.71293088e-28]]))
@example(data=None, dtype=torch.bfloat16, n=1, reduction="none", kind="ciou", convention="torchvision",
         fmt="xyxy", boxes=([[0.0, 0.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 2.71293088e-28]]))
def test_iou_loss(data, dtype, n, reduction, kind, convention, fmt, boxes):
    def draw_boxes():
        xy = arr(data, (n, 2), 0.0, 1000.0, (0.0, 1000.0))
        # no subnormal float32 sides: CIoU's true gradient ~1 / side is beyond the float32 range there
        # (a side of 1.4e-45 has d atan(w / h) / dw = 3.6e44), as half-precision gradients may be
        wh = arr(data, (n, 2), 0.0, 500.0, (0.0, 1e-3, 500.0), allow_subnormal=False)
        b = np.concatenate([xy, xy + wh], 1) if fmt == "xyxy" else np.concatenate([xy + wh / 2, wh], 1)
        b = tensor(b, dtype)
        if fmt == "xyxy":  # rounding to the dtype must keep x2 >= x1
            b = torch.cat([b[:, :2], torch.maximum(b[:, 2:], b[:, :2])], 1)
        return b.detach().requires_grad_(True)

    if boxes is None:
        b1, b2 = draw_boxes(), draw_boxes()
    else:
        b1, b2 = (tensor(np.array(b), dtype).detach().requires_grad_(True) for b in boxes)
    run_and_check(lambda a, b: F.iou_loss(a, b, kind=kind, box_format=fmt, convention=convention,
                                          reduction=reduction), dtype, b1, b2)
    m = F.pairwise_box_iou(b1.detach(), b2.detach(), kind=kind, box_format=fmt, convention=convention)
    assert m.shape == (n, n) and torch.isfinite(m).all()


@SETTINGS
@given(data=st.data(), dtype=dtypes, n=st.integers(0, 6), bins=st.integers(1, 17), reduction=reductions)
def test_distribution_focal_loss(data, dtype, n, bins, reduction):
    pred = tensor(arr(data, (n, bins), -1e4, 1e4, EXTREMES), dtype, grad=True)
    target = tensor(arr(data, (n,), 0.0, float(bins - 1), (0.0, float(bins - 1))), dtype)
    target = target.clamp(0, bins - 1)
    run_and_check(lambda p: F.distribution_focal_loss(p, target, reduction=reduction), dtype, pred)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_is_computed_in_float32(dtype):
    # the half result equals the float32 result on the same (half-representable) values
    x = torch.tensor([0.5, -3.0, 7.25, 0.0], dtype=dtype)
    y = torch.tensor([1.0, 0.0, 0.25, 0.5], dtype=dtype)
    for fn in (F.bce_with_logits, F.sigmoid_focal_loss, F.quality_focal_loss, F.bce_blur, F.mse_loss):
        assert torch.equal(fn(x, y), fn(x.float(), y.float()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.5, 2.0])
def test_saturated_logits_with_small_gamma(dtype, gamma):
    # sigmoid(60) rounds to 1: the modulating factor's base is exactly 0 and pow's derivative
    # there is infinite for gamma < 1; the gradient must stay finite (it is 0 in the limit)
    x = torch.tensor([60.0, -60.0, 1e4, -1e4, 0.0], dtype=dtype, requires_grad=True)
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0], dtype=dtype)
    lab = y.clone()
    for fn in (lambda a: F.sigmoid_focal_loss(a, y, gamma=gamma, reduction="sum"),
               lambda a: F.quality_focal_loss(a, y, gamma=gamma, reduction="sum"),
               lambda a: F.varifocal_loss(a, y, lab, gamma=gamma, reduction="sum")):
        run_and_check(fn, dtype, x)
