"""Machinery shared by the fused kernels: switches, the compile cache and the autograd Function.

A *pass* is a function ``(input, *tensors) -> (loss, grad)`` that computes the (reduced) loss and
its gradient with respect to ``input`` together, elementwise, from the closed-form derivative
(``pass(input, *tensors, out=buffer) -> loss`` stores the gradient into ``buffer`` instead).
:class:`CompiledPass` runs a pass through ``torch.compile(dynamic=True)`` (falling back to the
eager pass when compiling is switched off or fails) and :class:`FusedLoss` turns it into a
differentiable call that saves only the gradient.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
import types
import warnings
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from .._checks import compute_dtype

#: Environment switch for the whole fused path: ``DETLOSS_FUSED=0`` routes every call through the
#: plain autograd formula of :mod:`detloss.functional`.
ENV_FUSED = "DETLOSS_FUSED"
#: Environment switch for compiling: ``DETLOSS_COMPILE=0`` keeps the fused path but runs the
#: eager closed-form pass (no ``torch.compile``).
ENV_COMPILE = "DETLOSS_COMPILE"
#: Environment override of :data:`DEFAULT_MIN_NUMEL`.
ENV_MIN_NUMEL = "DETLOSS_FUSED_MIN_NUMEL"
#: Inputs with fewer elements than this take the plain formula: below it a loss costs well under a
#: millisecond either way and a first call would pay the compile time for nothing.
#: 262144 elements is e.g. 3277 anchors x 80 classes, or 65536 box pairs.
DEFAULT_MIN_NUMEL = 1 << 18

Pass = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
#: Inductor options of a pass: a dict, or a function returning one (called at the first compile).
CompileOptions = Union[Dict[str, object], Callable[[], Dict[str, object]]]

_OFF = ("0", "false", "no", "off")


def _env_on(name: str) -> bool:
    return os.environ.get(name, "1").strip().lower() not in _OFF


def fused_enabled() -> bool:
    """False when ``DETLOSS_FUSED=0`` (read at every call)."""
    return _env_on(ENV_FUSED)


def compile_enabled() -> bool:
    """False when ``DETLOSS_COMPILE=0`` (read at every call)."""
    return _env_on(ENV_COMPILE)


def min_numel() -> int:
    """The size threshold of :func:`use_fused`: ``DETLOSS_FUSED_MIN_NUMEL`` or the default."""
    raw = os.environ.get(ENV_MIN_NUMEL)
    if raw is None or raw.strip() == "":
        return DEFAULT_MIN_NUMEL
    try:
        return max(int(raw), 0)
    except ValueError:
        raise ValueError(f"{ENV_MIN_NUMEL}: expected an integer, got {raw!r}") from None


def _is_functorch_wrapped(t: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except Exception:  # pragma: no cover - private API moved
        return False


def use_fused(input: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether a loss on ``input`` (logits or predicted boxes) should run through a fused kernel.

    True when all of these hold: the fused path is on (``DETLOSS_FUSED`` is not ``0``); autograd
    needs the gradient (grad mode on and ``input.requires_grad``); none of ``others`` (targets,
    weights) requires a gradient, since the kernels differentiate with respect to ``input`` only;
    ``input`` has at least :func:`min_numel` elements; and the call is not being traced by an
    outer ``torch.compile`` or a ``torch.func`` transform (those fuse or differentiate the plain
    formula themselves).
    """
    if not isinstance(input, torch.Tensor) or not input.requires_grad or not torch.is_grad_enabled():
        return False
    if not fused_enabled() or input.numel() < min_numel():
        return False
    if any(o is not None and o.requires_grad for o in others):
        return False
    if torch.compiler.is_compiling() or _is_functorch_wrapped(input):
        return False
    return True


def _fresh_code(fn: Callable, tag: str) -> Callable:
    """A copy of ``fn`` with its own code object.

    torch.compile keeps its cache (and its recompile limit) per code object; every configuration
    (loss, reduction, hyperparameters) gets its own, so that configurations never evict each other.
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    fresh = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    fresh.__kwdefaults__ = fn.__kwdefaults__
    return fresh


class CompiledPass:
    """A pass compiled once with ``torch.compile(dynamic=True)`` and reused for every shape.

    Dynamic shapes mean one compiled kernel serves every batch size. Hyperparameters are baked into
    ``fn`` (closure constants) so that e.g. ``gamma=2`` compiles to a multiplication. If compiling
    is off (``DETLOSS_COMPILE=0``) or fails (no C++ compiler, unsupported platform), the eager pass
    runs instead; a failure warns once and is remembered.
    """

    def __init__(
        self, fn: Pass, tag: str, into_buffer: bool = True, options: Optional[CompileOptions] = None
    ) -> None:
        self.eager = fn
        self.tag = tag
        self.into_buffer = into_buffer
        self.options = options
        self._compiled: Optional[Callable] = None
        self.failed = False

    def compile_options(self) -> Dict[str, object]:
        """The Inductor options of this pass (a callable given as ``options`` is resolved here,
        when the pass is first compiled, so that probing the machine costs nothing otherwise)."""
        opts = self.options() if callable(self.options) else self.options
        return dict(opts or {})

    def __call__(self, *args: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss, grad)``; with ``out`` (a tensor shaped like the input, any strides, for an
        ``into_buffer`` pass) the gradient is stored there and ``out`` is returned as ``grad``."""
        if compile_enabled() and not self.failed:
            try:
                if self._compiled is None:
                    self._compiled = torch.compile(
                        _fresh_code(self.eager, self.tag), dynamic=True, options=self.compile_options() or None
                    )
                if not self.into_buffer:
                    return self._compiled(*args)
                # The compiled loop writes the gradient into a buffer allocated here (see
                # empty_gradient) instead of one Inductor allocates: same values, fewer page faults.
                if out is None:
                    out = empty_gradient(*args)  # type: ignore[arg-type]
                return self._compiled(*args, out=out), out
            except Exception as exc:  # compile unavailable: keep going with the eager pass
                self.failed = True
                warnings.warn(
                    f"detloss.kernels: torch.compile failed for {self.tag} ({type(exc).__name__}: {exc}); "
                    f"using the eager closed-form pass (set {ENV_COMPILE}=0 to skip compiling)",
                    RuntimeWarning,
                    stacklevel=3,
                )
        if out is not None:
            return self.eager(*args, out=out), out
        return self.eager(*args)


_DOUBLE_BACKWARD = (
    "detloss fused kernels compute the gradient in closed form and do not support double backward "
    f"(create_graph=True); set {ENV_FUSED}=0 to use the plain autograd formula"
)


class FusedLoss(torch.autograd.Function):
    """Loss whose forward runs a pass and keeps only the gradient; backward scales it.

    ``apply(run, input, *tensors)``: ``run(input, *tensors) -> (loss, grad)``, ``grad`` shaped like
    ``input``. Backward multiplies the saved gradient by ``grad_output`` in place (it is not needed
    afterwards) and hands it on, so the whole forward and backward allocate one gradient-sized
    buffer. When the graph is retained and backward runs again, the gradient is recomputed from the
    saved inputs. Gradients of half-precision inputs are kept in float32 until scaled, then cast.
    """

    @staticmethod
    def forward(ctx, run: Pass, input: torch.Tensor, *tensors: Optional[torch.Tensor]) -> torch.Tensor:  # type: ignore[override]
        loss, grad = run(input, *tensors)
        ctx.run = run
        ctx.grad = grad
        ctx.input_dtype = input.dtype
        ctx.n_tensors = len(tensors)
        ctx.save_for_backward(input, *tensors)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        grad = ctx.grad
        ctx.grad = None  # drop our reference: the engine may then reuse the buffer as .grad
        if grad is None:  # a retained graph, backward again
            saved = ctx.saved_tensors
            _, grad = ctx.run(*saved)
        grad = _scale_(grad, grad_output)
        if grad.dtype != ctx.input_dtype:
            grad = grad.to(ctx.input_dtype)
        return (None, grad) + (None,) * ctx.n_tensors


def _scale_(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """``grad * grad_output`` written into ``grad`` (skipped for a CPU scalar ``grad_output == 1``).

    A per-pair ``grad_output`` ``[...]`` of a box loss scales the ``[..., 4]`` gradient.
    """
    if grad_output.dim() == 0:
        if grad_output.device.type == "cpu" and float(grad_output) == 1.0:
            return grad
        return grad.mul_(grad_output)
    if grad_output.dim() < grad.dim():
        grad_output = grad_output.unsqueeze(-1)
    return grad.mul_(grad_output)


def make_pass(closed_form: Callable[..., Tuple[torch.Tensor, torch.Tensor]], reduction: str, **params) -> Pass:
    """The eager pass ``(input, *tensors) -> (loss, grad)`` of one loss configuration.

    ``closed_form(x, *tensors, **params)`` returns the elementwise loss and its derivative in
    ``x``. Tensors are cast to the compute dtype (float32 for half precision, float64 if any is
    float64); the gradient comes in the input's dtype, or float32 for half inputs (cast after
    scaling). ``"mean"`` divides loss and gradient by the number of loss elements.
    """

    def run(input: torch.Tensor, *tensors: Optional[torch.Tensor], out: Optional[torch.Tensor] = None):
        dtype = compute_dtype(input, *tensors)
        x = input.to(dtype)
        args = [None if t is None else t.to(dtype) for t in tensors]
        loss, grad = closed_form(x, *args, **params)
        if reduction == "sum":
            loss = loss.sum()
        elif reduction == "mean":
            n = loss.numel()
            loss, grad = loss.sum() / n, grad / n
        if out is not None:  # the compiled loop stores the gradient straight into `out`
            out.copy_(grad)
            return loss
        return loss, grad.to(gradient_dtype(input, *tensors))

    return run


def gradient_dtype(input: torch.Tensor, *tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype a pass returns the gradient in: the input's for float32/float64, else the compute
    dtype (half-precision gradients stay in float32 until scaled by ``grad_output``, then cast)."""
    if input.dtype in (torch.float32, torch.float64):
        return input.dtype
    return compute_dtype(input, *tensors)


_HUGE_PAGE = 2 * 1024 * 1024
_MADV_HUGEPAGE = 14  # Linux
@functools.lru_cache(maxsize=None)
def _madvise() -> Callable[..., int]:
    """libc's ``madvise`` on Linux; elsewhere (or without libc) a stand-in that does nothing."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            fn = libc.madvise
            fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            return fn
        except (OSError, AttributeError):
            pass
    return lambda *args: -1


def empty_gradient(input: torch.Tensor, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """An uninitialized gradient buffer shaped like ``input``.

    A fresh buffer of tens of megabytes costs more in first-touch page faults (one per 4 KiB page)
    than the fused pass spends computing it. On Linux the buffer's memory is marked
    ``MADV_HUGEPAGE``, so where transparent huge pages are enabled (``always`` or ``madvise``) it is
    faulted in 2 MiB at a time; elsewhere this is a plain ``torch.empty``. Nothing else changes:
    the memory is freed as usual.
    """
    grad = torch.empty(input.shape, dtype=gradient_dtype(input, *tensors), device=input.device)
    nbytes = grad.numel() * grad.element_size()
    if grad.device.type == "cpu" and nbytes >= 2 * _HUGE_PAGE:
        ptr = grad.data_ptr()
        start = -(-ptr // _HUGE_PAGE) * _HUGE_PAGE
        end = (ptr + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if end > start:
            _madvise()(start, end - start, _MADV_HUGEPAGE)  # advice only: failure is harmless
    return grad


_PASSES: Dict[tuple, CompiledPass] = {}


def inductor_options(options: Dict[str, object]) -> Dict[str, object]:
    """Those of ``options`` (dotted Inductor config keys, e.g. ``"cpp.simdlen"``) that this torch's
    Inductor has. Options are tuning only; an older torch without one compiles with its defaults."""
    try:
        import torch._inductor.config as inductor_config
    except Exception:  # pragma: no cover - no Inductor at all
        return {}

    def known(key: str) -> bool:
        node: object = inductor_config
        for part in key.split("."):
            if not hasattr(node, part):
                return False
            node = getattr(node, part)
        return True

    return {key: value for key, value in options.items() if known(key)}


def cached_pass(
    name: str,
    closed_form: Callable,
    reduction: str,
    into_buffer: bool = True,
    options: Optional[CompileOptions] = None,
    **params,
) -> CompiledPass:
    """The :class:`CompiledPass` of ``closed_form`` for this reduction and hyperparameters, made once.

    ``into_buffer``: the compiled loop stores the gradient into :func:`empty_gradient` (for
    elementwise passes; a pass whose gradient Inductor assembles from parts, like the box losses'
    ``[..., 4]``, would copy it there instead, so it keeps its own output). ``options``: Inductor
    options for this pass (see :func:`inductor_options`)."""
    key = (name, reduction) + tuple(sorted(params.items()))
    cp = _PASSES.get(key)
    if cp is None:
        tag = "_".join([name, reduction] + [f"{k}{v}" for k, v in sorted(params.items())])
        tag = "".join(c if c.isalnum() else "_" for c in tag)
        cp = CompiledPass(make_pass(closed_form, reduction, **params), tag, into_buffer, options)
        _PASSES[key] = cp
    return cp
