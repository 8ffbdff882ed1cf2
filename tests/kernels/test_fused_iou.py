"""Fused IoU losses (eager closed-form pass) against the plain autograd formula of
detloss.functional.iou_loss, the ground truth: iou/giou/diou/ciou, both conventions, both box
formats, every reduction, with identical, disjoint, nested, touching and zero-size boxes."""
from __future__ import annotations

import pytest
import torch

from _kernel_helpers import assert_parity, loss_and_grad
from detloss import kernels
from detloss.boxes import xyxy_to_cxcywh
from detloss.functional import iou as fiou
from detloss.kernels.iou import FUSED_KINDS


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
