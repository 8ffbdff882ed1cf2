"""The plain path (the closed form run eagerly in chunks): chunking changes nothing but rounding
of the sums, whatever broadcasts, and it keeps one gradient-sized buffer where autograd through
a formula keeps a dozen."""
from __future__ import annotations

import math

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from _kernel_helpers import bce_formula, focal_formula, loss_and_grad
from detloss import kernels
from detloss.kernels import _runtime


def _inputs(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 4
    t = (torch.rand(shape, generator=g, dtype=torch.float64) > 0.8).double()
    return x.to(dtype), t.to(dtype)


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Chunks of 50 elements (25 box pairs), so that small tensors are cut into many (and ragged) pieces."""
    monkeypatch.setattr(_runtime, "PLAIN_CHUNK_PER_THREAD", 50)
    monkeypatch.setattr(_runtime, "PLAIN_PAIRS_PER_THREAD", 25)


@pytest.mark.parametrize("shape, w_shape, pw_shape", [
    ((37, 5), None, None),
    ((37, 5), (37, 1), (5,)),
    ((3, 21, 5), (21, 5), (1, 5)),
    ((3, 21, 5), (3, 1, 1), None),
    ((301,), (), (301,)),
    ((2, 3, 4, 5), (3, 1, 5), (4, 1)),
])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_chunks_equal_the_whole_tensor(tiny_chunks, shape, w_shape, pw_shape, reduction):
    x, t = _inputs(shape)
    g = torch.Generator().manual_seed(1)
    w = None if w_shape is None else torch.rand(w_shape, generator=g, dtype=torch.float64)
    pw = None if pw_shape is None else torch.rand(pw_shape, generator=g, dtype=torch.float64) * 3
    go = torch.rand(shape, dtype=torch.float64) if reduction == "none" else None
    pass_ = kernels.dense.get_pass("bce_with_logits", reduction)
    loss, grad = pass_.plain(x, t, w, pw)
    whole_loss, whole_grad = pass_.eager(x, t, w, pw)
    torch.testing.assert_close(loss, whole_loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-13, atol=0)
    lp, gp = loss_and_grad(lambda a: kernels.fused_bce_with_logits(a, t, w, pw, reduction, compiled=False), x, go)
    lr, gr = loss_and_grad(lambda a: bce_formula(a, t, w, pw, reduction), x, go)
    torch.testing.assert_close(lp, lr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gp, gr, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", [(200, 4), (3, 70, 4)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_box_chunks_keep_whole_boxes(tiny_chunks, shape, reduction):
    g = torch.Generator().manual_seed(2)
    target = torch.rand(shape, generator=g, dtype=torch.float64) * 10
    target[..., 2:] = target[..., :2] + 1 + target[..., 2:]
    pred = target + torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    pass_ = kernels.iou.get_iou_pass("ciou", "xyxy", "torchvision", 1e-7, reduction)
    calls = []
    real = pass_.closed_form
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pass_, "closed_form", lambda *a, **k: calls.append(a[0].shape[0]) or real(*a, **k))
        loss, grad = pass_.plain(pred, target)
    pairs = math.prod(shape[:-1])
    chunk = _runtime.PLAIN_PAIRS_PER_THREAD * torch.get_num_threads()
    assert len(calls) == -(-pairs // chunk) and max(calls) == chunk  # chunks of whole pairs
    whole_loss, whole_grad = pass_.eager(pred, target)
    assert loss.shape == whole_loss.shape and grad.shape == pred.shape
    torch.testing.assert_close(loss, whole_loss, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(grad, whole_grad, rtol=1e-13, atol=0)


def test_empty_input_mean_is_zero():
    x = torch.zeros(0, 80, requires_grad=True)
    loss = kernels.fused_sigmoid_focal_loss(x, torch.zeros(0, 80), reduction="mean", compiled=False)
    loss.backward()
    assert loss.item() == 0.0 and x.grad.shape == (0, 80)


def _peak_extra_bytes(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def test_plain_path_keeps_one_gradient_buffer(monkeypatch):
    """fwd+bwd of the plain focal loss at 40000 x 80 (float32) peaks at one gradient-sized buffer
    plus a chunk's temporaries: autograd through the formula keeps more than eight."""
    monkeypatch.setenv("DETLOSS_FUSED", "0")
    x, t = _inputs((40000, 80), dtype=torch.float32)
    x.requires_grad_()
    grad_bytes = x.numel() * x.element_size()

    def plain():
        kernels.fused_sigmoid_focal_loss(x, t, 0.25, 2.0, "sum", compiled=False).backward()
        x.grad = None

    def formula():
        focal_formula(x, t, 0.25, 2.0, "sum").backward()
        x.grad = None

    plain()
    chunk_bytes = _runtime.PLAIN_CHUNK_PER_THREAD * torch.get_num_threads() * x.element_size()
    assert _peak_extra_bytes(plain) <= grad_bytes + 16 * chunk_bytes < 2 * grad_bytes
    assert _peak_extra_bytes(formula) >= 8 * grad_bytes
