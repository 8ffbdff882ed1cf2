"""Fused IoU losses (eager closed-form pass) against the plain autograd formula of
detloss.functional.iou_loss, the ground truth: iou/giou/diou/ciou, both conventions, both box
formats, every reduction, with identical, disjoint, nested, touching and zero-size boxes."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from _kernel_helpers import assert_parity, loss_and_grad
from detloss import kernels
from detloss.boxes import xyxy_to_cxcywh
from detloss.functional import iou as fiou
from detloss.kernels import iou as kiou
from detloss.kernels.iou import FUSED_KINDS
from detloss.kernels.iou_formula import atan_ratio


def _pairs(n=400, dtype=torch.float64, seed=0):
    """pred, target xyxy with every degenerate case the formulas branch on."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 50
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 20 + 0.5
    target = torch.cat([xy, xy + wh], 1)
    pred = target + torch.randn(n, 4, generator=g, dtype=torch.float64) * 4
    pred[:, 2:] = torch.maximum(pred[:, 2:], pred[:, :2] + 0.1)
    pred[:20] = target[:20]  # identical: every max/min is a tie
    pred[20:30, 2] = pred[20:30, 0]  # zero width
    pred[30:40] = target[30:40] + 100  # disjoint
    pred[40:50, 0] = target[40:50, 2]  # touching edge to edge
    pred[50:60] = target[50:60] * 0.5 + torch.cat([xy[50:60], xy[50:60]], 1) * 0.5  # nested-ish
    pred[60:65, 1::2] = pred[60:65, 1:2]  # zero height
    return pred.to(dtype), target.to(dtype)


def _formats(pred, target, box_format):
    if box_format == "xyxy":
        return pred, target
    return xyxy_to_cxcywh(pred), xyxy_to_cxcywh(target)


@pytest.mark.parametrize("convention", ["torchvision", "yolov5"])
@pytest.mark.parametrize("box_format", ["xyxy", "cxcywh"])
@pytest.mark.parametrize("kind", FUSED_KINDS)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_formula_float64(eager, convention, box_format, kind, reduction):
    pred, target = _formats(*_pairs(), box_format)
    go = torch.rand(pred.shape[0], dtype=torch.float64) if reduction == "none" else None
    assert_parity(
        lambda p: kernels.fused_iou_loss(p, target, kind, box_format, convention, reduction),
        lambda p: fiou._iou_loss_formula(p, target, kind, box_format, convention, reduction),
        pred,
        go,
    )


@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_batched_shape_and_float32(eager, kind):
    pred, target = _pairs(240, dtype=torch.float32, seed=1)
    pred, target = pred.view(2, 3, 40, 4), target.view(2, 3, 40, 4)
    lf, gf = loss_and_grad(lambda p: kernels.fused_iou_loss(p, target, kind, reduction="none"), pred)
    lr, gr = loss_and_grad(lambda p: fiou._iou_loss_formula(p, target, kind, reduction="none"), pred)
    assert lf.shape == (2, 3, 40) and gf.shape == pred.shape and gf.dtype == torch.float32
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_boxes_computed_in_float32(eager, dtype):
    pred, target = _pairs(200, dtype=torch.float32, seed=2)
    ph, th = pred.to(dtype), target.to(dtype)
    lf, gf = loss_and_grad(lambda p: kernels.fused_iou_loss(p, th, "ciou", reduction="sum"), ph)
    lr, gr = loss_and_grad(lambda p: fiou._iou_loss_formula(p.float(), th.float(), "ciou", reduction="sum"), ph)
    assert lf.dtype == torch.float32 and gf.dtype == dtype
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gf.float(), gr.float(), rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("convention", ["torchvision", "yolov5"])
@pytest.mark.parametrize("box_format", ["xyxy", "cxcywh"])
def test_gradcheck_float64(eager, convention, box_format):
    g = torch.Generator().manual_seed(3)
    xy = torch.rand(12, 2, generator=g, dtype=torch.float64) * 5
    target = torch.cat([xy, xy + 2 + torch.rand(12, 2, generator=g, dtype=torch.float64)], 1)
    pred = target + torch.randn(12, 4, generator=g, dtype=torch.float64) * 0.6  # overlapping, no ties
    pred, target = _formats(pred, target, box_format)
    pred.requires_grad_()
    # not ciou: both originals hold its alpha constant, so its gradient is not the derivative that
    # finite differences see (ciou is checked against the formula and the reference data instead)
    for kind in ("iou", "giou", "diou"):
        fn = lambda p: kernels.fused_iou_loss(p, target, kind, box_format, convention, "none")  # noqa: E731
        assert torch.autograd.gradcheck(fn, (pred,), eps=1e-6, atol=1e-7, rtol=1e-5), kind


def test_unfused_kind_rejected(eager):
    pred, target = _pairs(10)
    with pytest.raises(ValueError, match="kind"):
        kernels.fused_iou_loss(pred.requires_grad_(), target, kind="siou")


_SIDES = (0.0, 1e-3, 0.5, 2.0, 7.0, 1e3)


def _formula_angle_difference(w1, h1, w2, h2):
    return atan_ratio(w2, h2) - atan_ratio(w1, h1)


def test_aspect_angle_difference_every_side_case():
    """One atan of the angle between (h, w) vectors equals the formula's two atans, including
    points, zero heights, zero widths and (unvalidated) negative widths."""
    sides = torch.tensor(_SIDES + (-0.5, -3.0), dtype=torch.float64)
    w1, h1, w2, h2 = torch.cartesian_prod(sides, sides, sides, sides).unbind(1)
    keep = (h1 >= 0) & (h2 >= 0)  # negative heights cannot pass validation and xyxy adds eps only
    w1, h1, w2, h2 = w1[keep], h1[keep], w2[keep], h2[keep]
    w1.requires_grad_(), h1.requires_grad_()
    got, dw, dh = kiou._aspect_angle_difference(w1, h1, w2, h2)
    want = _formula_angle_difference(w1, h1, w2, h2)
    torch.testing.assert_close(got, want.detach(), rtol=1e-14, atol=1e-15)
    assert float(want.detach().abs().max()) > 3.0  # the +-pi correction branch was exercised
    want_dw, want_dh = torch.autograd.grad(-want.sum(), (w1, h1))  # slopes of atan(w1 / h1)
    torch.testing.assert_close(dw, want_dw, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(dh, want_dh, rtol=1e-13, atol=1e-15)


def test_aspect_angle_difference_stacked_equals_the_pairwise_one():
    """The eager box pass computes both boxes' aspect vectors in one set of ops
    (``_aspect_angle_difference_stacked`` of ``[w1, w2]``, ``[h1, h2]``): the same angle and
    slopes as the per-box function, bit for bit, on every side case."""
    sides = torch.tensor(_SIDES + (-0.5, -3.0), dtype=torch.float64)
    w1, h1, w2, h2 = torch.cartesian_prod(sides, sides, sides, sides).unbind(1)
    for a, b in zip(kiou._aspect_angle_difference(w1, h1, w2, h2),
                    kiou._aspect_angle_difference_stacked(torch.stack((w1, w2)), torch.stack((h1, h2)))):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


_side = st.one_of(st.just(0.0), st.floats(1e-6, 1e4))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(_side, _side, _side, _side), min_size=1, max_size=16))
def test_aspect_angle_difference_property(rows):
    w1, h1, w2, h2 = torch.tensor(rows, dtype=torch.float64).unbind(1)
    got = kiou._aspect_angle_difference(w1, h1, w2, h2)[0]
    torch.testing.assert_close(got, _formula_angle_difference(w1, h1, w2, h2), rtol=1e-12, atol=1e-13)
    w1, h1, w2, h2 = w1.float(), h1.float(), w2.float(), h2.float()
    got32 = kiou._aspect_angle_difference(w1, h1, w2, h2)[0]
    torch.testing.assert_close(got32, _formula_angle_difference(w1, h1, w2, h2), rtol=1e-5, atol=1e-6)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(*[st.floats(0.0, 3.0000000054977558e38, width=32)] * 4), min_size=1, max_size=16),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_aspect_angle_difference_finite_for_any_sides(rows, dtype):
    """Subnormal, tiny and huge sides (whose products underflow or overflow) still give a finite
    angle in [-pi, pi], and finite slopes wherever the larger side is a normal float."""
    w1, h1, w2, h2 = torch.tensor(rows, dtype=dtype).unbind(1)
    got, dw, dh = kiou._aspect_angle_difference(w1, h1, w2, h2)
    assert torch.isfinite(got).all() and float(got.abs().max()) <= math.pi + 1e-6
    normal = w1.abs().maximum(h1) >= torch.finfo(dtype).tiny  # slopes ~1/side: finite for normal sides
    assert torch.isfinite(dw[normal]).all() and torch.isfinite(dh[normal]).all()


def test_compiled_box_pass_vectorizes_strided_boxes():
    """The box passes ask Inductor to vectorize loops whose loads are strided ([N, 4] boxes), with
    8-lane vectors where the widest are 16 lanes; options this torch lacks are dropped."""
    import torch._inductor.config as inductor_config

    cp = kiou.get_iou_pass("giou", "xyxy", "torchvision", 1e-7, "sum")
    opts = cp.compile_options()
    assert opts == kiou.box_pass_options()
    if hasattr(inductor_config.cpp, "enable_tiling_heuristics"):
        assert opts["cpp.enable_tiling_heuristics"] is False
    assert set(opts) <= {"cpp.enable_tiling_heuristics", "cpp.simdlen"}
    if "cpp.simdlen" in opts:
        from torch._inductor import cpu_vec_isa

        assert opts["cpp.simdlen"] == 256 and cpu_vec_isa.pick_vec_isa().bit_width() == 512


@pytest.mark.parametrize("scale", [1e-30, 1e-15, 1e15])
@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_tiny_and_huge_boxes_float32_finite_and_equal_formula(eager, kind, scale):
    """Boxes of 1e-30 to 1e15 units in float32 (squares of sides under- and overflow the float32
    range at the ends) give finite losses and gradients equal to the formula's."""
    pred, target = _pairs(200, dtype=torch.float32, seed=4)
    pred, target = pred * scale, target * scale
    pred = torch.cat([pred[:, :2], torch.maximum(pred[:, 2:], pred[:, :2])], 1)
    lf, gf = loss_and_grad(lambda p: kernels.fused_iou_loss(p, target, kind, reduction="none"), pred)
    lr, gr = loss_and_grad(lambda p: fiou._iou_loss_formula(p, target, kind, reduction="none"), pred)
    assert torch.isfinite(lf).all() and torch.isfinite(gf).all()
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gf * scale, gr * scale, rtol=1e-4, atol=1e-5)


def _inverted_pairs(n=300, seed=5):
    """Pairs of which about half have x2 < x1 and/or y2 < y1 (in either box): what validate=False
    lets through, e.g. FCOS predictions decoded from negative distances."""
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(n, 4, generator=g, dtype=torch.float64) * 5
    target = torch.randn(n, 4, generator=g, dtype=torch.float64) * 5
    target[: n // 2, 2:] = target[: n // 2, :2] + torch.rand(n // 2, 2, generator=g, dtype=torch.float64) * 4
    pred[:10, 3] = pred[:10, 1]  # zero heights
    pred[10:20, 2:] = pred[10:20, :2] - 1  # inverted in both directions
    return pred, target


@pytest.mark.parametrize("convention", ["torchvision", "yolov5"])
@pytest.mark.parametrize("box_format", ["xyxy", "cxcywh"])
@pytest.mark.parametrize("kind", FUSED_KINDS)
def test_inverted_boxes_match_formula(eager, convention, box_format, kind):
    """The closed form goes through the formula's arithmetic for inverted boxes too: values and
    gradients equal to rounding, through iou_loss(validate=False) on the fused path."""
    import detloss.functional as F

    pred, target = _inverted_pairs()
    if box_format == "cxcywh":  # negative sides
        pred, target = xyxy_to_cxcywh(pred), xyxy_to_cxcywh(target)
    assert bool(((pred[:, 2] < pred[:, 0]) if box_format == "xyxy" else (pred[:, 2] < 0)).any())
    go = torch.rand(pred.shape[0], dtype=torch.float64)
    assert_parity(
        lambda p: F.iou_loss(p, target, kind=kind, box_format=box_format, convention=convention, validate=False),
        lambda p: fiou._iou_loss_formula(p, target, kind, box_format, convention, "none"),
        pred,
        go,
    )
    with pytest.raises(ValueError, match="x2 >= x1|w >= 0"):
        F.iou_loss(pred, target, kind=kind, box_format=box_format, convention=convention)
