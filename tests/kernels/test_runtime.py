"""The fused path's machinery: when it is used, the environment switches, the autograd Function
(grad_output scaling, retained graphs, accumulation, double backward), the compile fallback, and
the dispatch from detloss.functional."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.exc import TorchDynamoException

from _kernel_helpers import bce_formula, focal_formula, loss_and_grad
from detloss import functional as F
from detloss import kernels
from detloss.kernels import _runtime


def _xt(shape=(64, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 3
    t = (torch.rand(shape, generator=g, dtype=torch.float64) > 0.7).double()
    return x, t


def test_use_fused_decision(monkeypatch):
    monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "100")
    monkeypatch.delenv("DETLOSS_FUSED", raising=False)
    big = torch.zeros(10, 10, requires_grad=True)
    small = torch.zeros(9, 11, requires_grad=True)
    t = torch.zeros(10, 10)
    assert kernels.use_fused(big, t)
    assert not kernels.use_fused(small, t)  # below the threshold
    assert not kernels.use_fused(big.detach(), t)  # no gradient wanted
    assert not kernels.use_fused(big, t.clone().requires_grad_())  # target needs a gradient
    with torch.no_grad():
        assert not kernels.use_fused(big, t)
    monkeypatch.setenv("DETLOSS_FUSED", "0")
    assert not kernels.use_fused(big, t)


def test_threshold_default_and_bad_value(monkeypatch):
    monkeypatch.delenv("DETLOSS_FUSED_MIN_NUMEL", raising=False)
    assert kernels.min_numel() == kernels.DEFAULT_MIN_NUMEL == 1 << 18
    monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "lots")
    with pytest.raises(ValueError, match="DETLOSS_FUSED_MIN_NUMEL.*integer.*'lots'"):
        kernels.min_numel()


def test_grad_output_scaling_and_accumulation(eager):
    x, t = _xt()
    xr = x.clone().requires_grad_()
    (kernels.fused_sigmoid_focal_loss(xr, t, reduction="sum") * 3.0).backward()
    (kernels.fused_sigmoid_focal_loss(xr, t, reduction="sum") * -0.5).backward()  # accumulates
    ref = x.clone().requires_grad_()
    (focal_formula(ref, t, reduction="sum") * 2.5).backward()
    torch.testing.assert_close(xr.grad, ref.grad, rtol=1e-12, atol=1e-14)


def test_non_leaf_input_and_retained_graph(eager):
    x, t = _xt()
    w = x.clone().requires_grad_()
    h = w * 2.0  # non-leaf: the gradient flows on through the Function
    loss = kernels.fused_bce_with_logits(h, t, reduction="mean")
    loss.backward(retain_graph=True)
    first = w.grad.clone()
    loss.backward()  # the graph is retained: the gradient is recomputed, not reused after scaling
    torch.testing.assert_close(w.grad, 2 * first, rtol=1e-12, atol=0)
    ref = x.clone().requires_grad_()
    F.bce_with_logits(ref * 2.0, t, reduction="mean").backward()
    torch.testing.assert_close(first, ref.grad, rtol=1e-12, atol=1e-15)


def test_double_backward_through_the_formula(eager):
    """create_graph=True: the first gradient is the closed form's, its graph the formula's, so the
    second derivative (Hessian-vector product) equals the formula's."""
    x, t = _xt()
    v = torch.randn_like(x)
    for fused, formula in (
        (lambda a: kernels.fused_sigmoid_focal_loss(a, t, 0.25, 2.0, "sum"),
         lambda a: focal_formula(a, t, 0.25, 2.0, "sum")),
        (lambda a: kernels.fused_bce_with_logits(a, t, None, None, "mean"),
         lambda a: bce_formula(a, t, None, None, "mean")),
    ):
        xr = x.clone().requires_grad_()
        (g,) = torch.autograd.grad(fused(xr), xr, create_graph=True)
        (hv,) = torch.autograd.grad((g * v).sum(), xr)
        xf = x.clone().requires_grad_()
        (gf,) = torch.autograd.grad(formula(xf), xf, create_graph=True)
        (hvf,) = torch.autograd.grad((gf * v).sum(), xf)
        torch.testing.assert_close(g.detach(), gf.detach(), rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(hv, hvf, rtol=1e-10, atol=1e-14)


def test_double_backward_gradgradcheck(eager):
    x, t = _xt((6, 4))
    w = torch.rand(4, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    fns = [
        lambda a: kernels.fused_sigmoid_focal_loss(a, t, 0.25, 1.5, "none"),
        lambda a: kernels.fused_bce_with_logits(a, t, w, None, "sum"),
        lambda a: kernels.fused_varifocal_loss(a, t * 0.5, t, 0.75, 2.0, "mean"),
    ]
    for fn in fns:
        assert torch.autograd.gradgradcheck(fn, (xr,))


def test_gradients_of_targets_and_weights(eager):
    """Targets and weights that require grad get the formula's gradients (the input keeps the
    closed form's): gradcheck over all of them at once."""
    x, t = _xt((5, 4))
    t = torch.rand(5, 4, dtype=torch.float64)
    w = torch.rand(4, dtype=torch.float64)
    pw = torch.rand(4, dtype=torch.float64) * 3
    leaves = [a.clone().requires_grad_() for a in (x, t, w, pw)]
    assert torch.autograd.gradcheck(lambda a, b, c, d: kernels.fused_bce_with_logits(a, b, c, d, "sum", compiled=False),
                                    leaves)
    assert torch.autograd.gradcheck(lambda a, b: kernels.fused_sigmoid_focal_loss(a, b, 0.25, 2.0, "mean"),
                                    leaves[:2])


class _CompileFailure(TorchDynamoException):
    pass


def _broken_compile(error):
    def compile_(fn, **kw):
        def call(*a, **k):
            raise error

        return call

    return compile_


def test_compile_failure_falls_back_to_eager(monkeypatch):
    monkeypatch.setenv("DETLOSS_COMPILE", "1")
    monkeypatch.setattr(torch, "compile", _broken_compile(_CompileFailure("no compiler here")))
    x, t = _xt()
    cp = _runtime.LossPass(lambda a, b: (a * b, b), None, "sum", tag="test_fallback")
    with pytest.warns(RuntimeWarning, match="torch.compile failed.*eager closed-form"):
        loss, grad = cp(x, t)
    assert cp.failed
    torch.testing.assert_close(loss, (x * t).sum())
    loss2, _ = cp(x, t)  # remembered: no second warning, no second attempt
    torch.testing.assert_close(loss2, loss)


def test_runtime_error_of_a_compiled_call_propagates(monkeypatch):
    """An error of the call itself (out of memory, say) is the caller's: it propagates, and the
    compiled pass stays in place for the next call."""
    monkeypatch.setenv("DETLOSS_COMPILE", "1")
    monkeypatch.setattr(torch, "compile", _broken_compile(RuntimeError("CPU out of memory")))
    x, t = _xt()
    cp = _runtime.LossPass(lambda a, b: (a * b, b), None, "sum", tag="test_runtime_error")
    with pytest.raises(RuntimeError, match="out of memory"):
        cp(x, t)
    assert not cp.failed and cp.compiled._compiled is not None
    monkeypatch.setattr(cp.compiled, "_compiled", lambda a, b, out: (out.copy_(b), (a * b).sum())[1])
    loss, grad = cp(x, t)  # the next call runs the compiled pass again
    torch.testing.assert_close(loss, (x * t).sum())
    torch.testing.assert_close(grad, t)


def test_functional_dispatches_when_large(eager, monkeypatch):
    """Above the threshold the public functions run the compiled pass; below it (or with
    DETLOSS_FUSED=0, or a target that requires grad) the plain pass; both through FusedLoss."""
    x, t = _xt((32, 8))
    xr = x.clone().requires_grad_()
    monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "256")
    ran = []
    monkeypatch.setattr(_runtime.LossPass, "__call__", lambda self, *a: ran.append("compiled") or self.plain(*a))
    cases = [
        lambda a, y: F.sigmoid_focal_loss(a, y, reduction="sum"),
        lambda a, y: F.bce_with_logits(a, y),
        lambda a, y: F.bce_blur(a, y),
        lambda a, y: F.quality_focal_loss(a, y),
        lambda a, y: F.varifocal_loss(a, y, y),
    ]
    for fn in cases:
        ran.clear()
        assert type(fn(xr, t).grad_fn).__name__ == "FusedLossBackward" and ran == ["compiled"]
        ran.clear()
        assert type(fn(xr[:16], t[:16]).grad_fn).__name__ == "FusedLossBackward" and ran == []
    ran.clear()
    F.sigmoid_focal_loss(xr, t.clone().requires_grad_())
    assert ran == []
    boxes = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64).repeat(64, 1)
    pred = (boxes + 0.1).requires_grad_()
    assert type(F.iou_loss(pred, boxes, kind="ciou").grad_fn).__name__ == "FusedLossBackward"
    assert ran == ["compiled"]
    assert type(F.iou_loss(pred, boxes, kind="siou").grad_fn).__name__ != "FusedLossBackward"
    monkeypatch.setenv("DETLOSS_FUSED", "0")
    ran.clear()
    F.sigmoid_focal_loss(xr, t)
    assert ran == []


def test_functional_validation_runs_before_dispatch(eager):
    x = torch.zeros(4, 3, requires_grad=True)
    with pytest.raises(ValueError, match="target"):
        F.sigmoid_focal_loss(x, torch.zeros(4, 2))
    with pytest.raises(TypeError, match="input"):
        F.bce_with_logits(torch.zeros(4, 3, dtype=torch.long), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="pred"):
        F.iou_loss(torch.tensor([[2.0, 0.0, 1.0, 1.0]], requires_grad=True), torch.zeros(1, 4))


def test_dispatched_result_equals_formula(eager, monkeypatch):
    x, t = _xt((40, 10), seed=3)
    monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "1")
    lf, gf = loss_and_grad(lambda a: F.sigmoid_focal_loss(a, t, gamma=1.5, reduction="mean"), x)
    monkeypatch.setenv("DETLOSS_FUSED", "0")
    lr, gr = loss_and_grad(lambda a: F.sigmoid_focal_loss(a, t, gamma=1.5, reduction="mean"), x)
    torch.testing.assert_close(lf, lr, rtol=1e-10, atol=0)
    torch.testing.assert_close(gf, gr, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("dtype, grad_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                               (torch.float16, torch.float32), (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("numel", [10, 3 << 20])  # below and above the huge-page advice threshold
def test_empty_gradient_shape_dtype_and_usable(dtype, grad_dtype, numel):
    x = torch.zeros(numel // 4, 4, dtype=dtype)
    g = _runtime.empty_gradient(x, torch.zeros_like(x))
    assert g.shape == x.shape and g.dtype == grad_dtype and g.is_contiguous()
    g.fill_(2.0)  # the advised memory is ordinary memory
    assert float(g.sum()) == 2.0 * g.numel()


def test_inductor_options_keep_only_known_keys():
    import torch._inductor.config as inductor_config

    opts = _runtime.inductor_options({"cpp.no_such_option": 1, "no_such_section.x": 2})
    assert opts == {}
    assert _runtime.inductor_options({"cpp.simdlen": None}) == (
        {"cpp.simdlen": None} if hasattr(inductor_config.cpp, "simdlen") else {}
    )


def test_compiled_pass_hands_its_options_to_torch_compile(monkeypatch):
    monkeypatch.setenv("DETLOSS_COMPILE", "1")
    seen = {}

    def fake_compile(fn, **kw):
        seen.update(kw)
        return fn

    monkeypatch.setattr(torch, "compile", fake_compile)
    x, t = _xt()
    cp = _runtime.LossPass(
        lambda a, b: (a * b, b), None, "sum", tag="test_options", into_buffer=False, options={"cpp.simdlen": None},
    )
    cp(x, t)
    assert seen == {"dynamic": True, "options": {"cpp.simdlen": None}}
    seen.clear()
    cp_plain = _runtime.LossPass(lambda a, b: (a * b, b), None, "sum", tag="t2", into_buffer=False)
    cp_plain(x, t)
    assert seen == {"dynamic": True, "options": None}


def test_fused_function_under_torch_func_grad(eager):
    """FusedLoss has setup_context: torch.func.grad differentiates it (the closed form's gradient)."""
    x, t = _xt()
    for fn in (lambda a: kernels.fused_sigmoid_focal_loss(a, t, 0.25, 2.0, "sum"),
               lambda a: kernels.fused_bce_with_logits(a, t, None, None, "mean"),
               lambda a: kernels.fused_iou_loss(a.view(-1, 4)[:, [0, 1, 0, 1]].abs().cumsum(1), a.new_ones(128, 4),
                                                "giou", reduction="sum")):
        xr = x.clone().requires_grad_()
        fn(xr).backward()
        torch.testing.assert_close(torch.func.grad(fn)(x), xr.grad, rtol=1e-12, atol=0)


def test_kernels_never_import_functional():
    """Layers one way: detloss.functional imports detloss.kernels, never the reverse (checked on
    the source: every import statement of every kernels module)."""
    import ast
    import pathlib

    root = pathlib.Path(kernels.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            assert not any("functional" in n for n in names), f"{path.name} imports {names}"


def test_one_bce_core():
    """Every dense loss of detloss.functional runs the kernels' closed forms at every size (the
    FusedLoss Function, compiled or plain), and the constants are the kernels' own."""
    from detloss.functional import bce as fbce

    assert fbce.BLUR_EPS is kernels.BLUR_EPS
    x, t = _xt((4, 3))
    xr = x.clone().requires_grad_()
    for fn in (F.bce_with_logits, F.sigmoid_focal_loss, F.quality_focal_loss, F.bce_blur,
               lambda a, y: F.varifocal_loss(a, y, y)):
        assert type(fn(xr, t).grad_fn).__name__ == "FusedLossBackward"


def test_compiled_function_falls_back_on_compile_errors_only(monkeypatch):
    """CompiledFunction (the box decoding's runner) has LossPass's rule: a compile failure warns
    once and runs the function eagerly from then on; an error of the call propagates and keeps
    the compiled function."""
    monkeypatch.setenv("DETLOSS_COMPILE", "1")
    x = torch.arange(6.0)
    monkeypatch.setattr(torch, "compile", _broken_compile(_CompileFailure("no compiler here")))
    fn = _runtime.CompiledFunction(lambda a: a * 2, "test_cf_fallback")
    with pytest.warns(RuntimeWarning, match="torch.compile failed for test_cf_fallback.*eagerly"):
        torch.testing.assert_close(fn(x), x * 2)
    assert fn.failed
    torch.testing.assert_close(fn(x), x * 2)  # no second attempt, no warning
    monkeypatch.setattr(torch, "compile", _broken_compile(RuntimeError("CPU out of memory")))
    fn = _runtime.CompiledFunction(lambda a: a * 2, "test_cf_runtime")
    with pytest.raises(RuntimeError, match="out of memory"):
        fn(x)
    assert not fn.failed and fn._compiled is not None
    monkeypatch.setenv("DETLOSS_COMPILE", "0")  # switched off: the eager function, every call
    torch.testing.assert_close(fn(x), x * 2)
