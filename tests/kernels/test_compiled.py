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
    assert cp.compiled._compiled is not None and not cp.failed
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


def _head_maps(bs, sizes, reg_max, nc, seed):
    g = torch.Generator().manual_seed(seed)
    maps = [torch.randn(bs, 4 * reg_max + nc, n, generator=g) * 3 for n in sizes]
    maps[0][0, :reg_max, 0] = torch.tensor([90.0] + [-90.0] * (reg_max - 1))  # exp would overflow unshifted
    return maps


def test_dfl_decode_compiled_matches_softmax_matmul(compiled):
    """decode_head_maps (one compiled loop over the maps' layout) against the reference's
    softmax(-1).matmul(proj) decoding (decode_distances) on the transposed box channels: the
    same boxes to a few ulps, on two sets of level sizes with one graph."""
    from detloss.anchors import make_anchors
    from detloss.losses.yolov8 import decode_distances

    graphs = None
    for bs, side in ((3, 16), (5, 24)):  # (a batch of 2 would share the symbol of the points' 2)
        levels = [(side // s, side // s, float(s)) for s in (1, 2, 4)]
        sizes = [h * w for h, w, _ in levels]
        maps = _head_maps(bs, sizes, 16, 3, seed=side)
        points, _ = make_anchors(levels, torch.float32)
        got = kernels.decode_head_maps(maps, points.split(sizes), 16)
        want = torch.cat([decode_distances(m[:, :64].transpose(1, 2), p) for m, p in zip(maps, points.split(sizes))], 1)
        assert got.shape == (bs, sum(sizes), 4) and torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=2e-6, atol=4e-6)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs, "recompiled for new sizes"


def test_yolov8_loss_compiled_matches_plain_path(compiled, monkeypatch):
    """YOLOv8Loss on the fused path compiled (class BCE, box decoding for the assigner, CIoU of the
    positives) against the plain path (DETLOSS_FUSED=0): the same assignment, terms and gradients."""
    from detloss import YOLOv8Loss

    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 64 + 5, s, s, generator=g) for s in (32, 16, 8)]
    wh = torch.rand(12, 2, generator=g) * 0.3 + 0.05
    xy = wh / 2 + torch.rand(12, 2, generator=g) * (1 - wh)
    targets = torch.cat((torch.arange(2).repeat_interleave(6)[:, None].float(),
                         torch.randint(0, 5, (12, 1), generator=g).float(), xy, wh), 1)
    loss = YOLOv8Loss(5)

    def run():
        leaves = [f.clone().requires_grad_() for f in feats]
        out = loss(leaves, targets)
        return out, torch.autograd.grad(out.total, leaves)

    fused, fused_grads = run()
    monkeypatch.setenv("DETLOSS_FUSED", "0")
    plain, plain_grads = run()
    assert fused.stats["num_pos"] == plain.stats["num_pos"] > 0
    torch.testing.assert_close(fused.total, plain.total, rtol=2e-6, atol=1e-6)
    for k in ("box", "cls", "dfl"):
        torch.testing.assert_close(fused.components[k], plain.components[k], rtol=2e-6, atol=1e-6)
    for a, b in zip(fused_grads, plain_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert abs(float(fused.stats["ciou_mean"]) - float(plain.stats["ciou_mean"])) < 1e-5


def test_onehot_pass_compiled_in_place_on_batch_strided_channels(compiled):
    """The one-hot pass as the YOLOv8 head runs it: all images at once on the class channels of a
    ``[B, 4 * reg_max + nc, N]`` map (a batch-strided view), the gradient stored into the same view
    of a buffer, the box channels untouched; equal to the dense target's BCE (values to rounding,
    gradients, ``-0.0`` logits included; the compiled closed form ties ``x`` to the labels'
    broadcast, ``x + 0 * label``, which must change nothing)."""
    from detloss.kernels.onehot import onehot_bce_into

    g = torch.Generator().manual_seed(3)
    b, bd, nc, n = 3, 8, 5, 37
    m = torch.randn(b, bd + nc, n, generator=g) * 4
    m[0, bd, :3] = torch.tensor([-0.0, 0.0, 60.0])
    label = torch.randint(0, nc, (b, 1, n), generator=g).float()
    score = torch.rand(b, 1, n, generator=g)
    chan = torch.arange(nc, dtype=torch.float32)[None, :, None]
    out = torch.full_like(m, 7.0)
    total = onehot_bce_into(out[:, bd:], m[:, bd:], label, score, chan, torch.ones_like(chan), torch.ones(()))
    dense = torch.where(chan == label, score, 0.0).expand(b, nc, n)
    x = m[:, bd:].detach().clone().requires_grad_()
    ref = bce_formula(x, dense, reduction="sum")
    (ref_grad,) = torch.autograd.grad(ref, x)
    torch.testing.assert_close(total, ref.detach(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out[:, bd:], ref_grad, rtol=1e-5, atol=1e-7)
    assert bool((out[:, :bd] == 7.0).all())
    assert not kernels.onehot.onehot_bce_pass().failed
