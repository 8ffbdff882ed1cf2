"""The compiled pass (torch.compile(dynamic=True), Inductor C++ on CPU) against the plain autograd
formulas of detloss.functional: a few configurations only, each compiles once (seconds)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from _kernel_helpers import bce_formula, focal_formula, loss_and_grad
from detloss import kernels
from detloss.functional import iou as fiou
from detloss.kernels.dense import get_pass
from detloss.kernels.iou import get_iou_pass

pytestmark = pytest.mark.compiled


def _xt(n, c=80, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g) * 4
    x[0, :4] = torch.tensor([1e4, -1e4, 0.0, 50.0])
    t = (torch.rand(n, c, generator=g) > 0.95).float()
    return x.to(dtype), t.to(dtype)


def test_focal_sum_compiled_parity_and_dynamic_shapes(compiled):
    cp = get_pass("sigmoid_focal_loss", "sum", alpha=0.25, gamma=2.0)
    graphs = None
    for n in (300, 1000, 2017):  # three batch sizes, one compiled graph
        x, t = _xt(n, seed=n)
        lf, gf = loss_and_grad(lambda a: kernels.fused_sigmoid_focal_loss(a, t, 0.25, 2.0, "sum"), x)
        lr, gr = loss_and_grad(lambda a: focal_formula(a, t, 0.25, 2.0, "sum"), x)
        torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(gf, gr, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(gf).all()
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    assert cp._compiled is not None and not cp.failed
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled for a new batch size"


def test_bce_weights_half_input_compiled(compiled):
    x, t = _xt(512, 16, seed=1)
    w = torch.rand(16)
    pw = torch.linspace(0.5, 3.0, 16)
    xh = x.to(torch.float16)
    lf, gf = loss_and_grad(lambda a: kernels.fused_bce_with_logits(a, t, w, pw, "mean") * 1000.0, xh)
    lr, gr = loss_and_grad(lambda a: bce_formula(a.float(), t, w, pw, "mean") * 1000.0, xh)
    assert not get_pass("bce_with_logits", "mean").failed
    assert lf.dtype == torch.float32 and gf.dtype == torch.float16
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gf.float(), gr.float(), rtol=2e-3, atol=1e-6)


def test_ciou_none_compiled_parity(compiled):
    g = torch.Generator().manual_seed(2)
    xy = torch.rand(5000, 2, generator=g) * 100
    target = torch.cat([xy, xy + torch.rand(5000, 2, generator=g) * 30 + 1], 1)
    pred = target + torch.randn(5000, 4, generator=g) * 5
    pred[:, 2:] = torch.maximum(pred[:, 2:], pred[:, :2])
    pred[:100] = target[:100]  # identical: every min/max ties
    pred[100:150, 3] = pred[100:150, 1]  # zero height: the aspect angle's limit pi/2
    pred[150:200, 2] = pred[150:200, 0]  # zero width
    pred[200:210] = pred[200:210, :1].repeat(1, 4)  # points
    pred[210:260, :2] = target[210:260, 2:]  # touching at a corner
    pred[210:260, 2:] = pred[210:260, :2] + 3
    go = torch.rand(5000)
    lf, gf = loss_and_grad(lambda p: kernels.fused_iou_loss(p, target, "ciou", reduction="none"), pred, go)
    lr, gr = loss_and_grad(lambda p: fiou._iou_loss_formula(p, target, "ciou", reduction="none"), pred, go)
    assert not get_iou_pass("ciou", "xyxy", "torchvision", 1e-7, "none").failed
    torch.testing.assert_close(lf, lr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gf, gr, rtol=1e-4, atol=1e-5)


def test_inside_an_enclosing_torch_compile():
    """Traced by an outer torch.compile, the losses run their formulas (Dynamo traces and fuses
    them like any user code; no graph of our own Function): same values and gradients."""
    import detloss.functional as F

    x, t = _xt(64, 8, seed=5, dtype=torch.float64)
    boxes = torch.tensor([[0.0, 0.0, 2.0, 3.0], [1.0, 1.0, 4.0, 2.0]], dtype=torch.float64)
    pred = boxes + 0.25

    def losses(a, p):
        return F.sigmoid_focal_loss(a, t, reduction="sum") + F.bce_with_logits(a, t) + F.iou_loss(p, boxes, kind="ciou").sum()

    compiled = torch.compile(losses, backend="eager")
    lc, (gxc, gpc) = loss_and_grad2(compiled, x, pred)
    le, (gxe, gpe) = loss_and_grad2(losses, x, pred)
    torch.testing.assert_close(lc, le, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gxc, gxe, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(gpc, gpe, rtol=1e-10, atol=1e-14)


def loss_and_grad2(fn, a, b):
    a, b = a.clone().requires_grad_(), b.clone().requires_grad_()
    loss = fn(a, b)
    return loss.detach(), torch.autograd.grad(loss, (a, b))
