"""Machinery shared by the fused kernels: switches, the three ways to run a pass, the autograd Function.

A *closed form* ``closed_form(x, *tensors, **params) -> (loss, grad)`` computes a loss elementwise
together with its derivative in ``x`` (the logits or the predicted boxes). A *formula*
``formula(x, *tensors, **params) -> loss`` is the same loss written as the originals write it, with
differentiable ops. A :class:`LossPass` is one configuration of both (reduction, hyperparameters)
and runs it three ways:

* ``pass_(input, *tensors)``: compiled with ``torch.compile(dynamic=True)``, one loop over the
  elements (the fused path; falls back to :meth:`LossPass.plain` when compiling is switched off or
  fails to compile);
* :meth:`LossPass.plain`: the closed form run eagerly over cache-sized chunks of the input (the
  plain path: small inputs, ``DETLOSS_FUSED=0``, targets that require grad, ``torch.func.grad``);
* :meth:`LossPass.formula`: autograd through the formula (inside ``vmap`` or an enclosing
  ``torch.compile``, which batch or fuse it themselves; and for double backward).

:func:`apply_pass` picks one and :class:`FusedLoss` makes it differentiable: forward keeps only the
closed-form gradient, backward scales it; gradients of other tensors and second derivatives come
from autograd through the formula.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import sys
import types
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .._checks import compute_dtype

#: Environment switch for the compiled path: ``DETLOSS_FUSED=0`` runs every loss on the plain path
#: (the same closed form, eagerly; see :meth:`LossPass.plain`).
ENV_FUSED = "DETLOSS_FUSED"
#: Environment switch for compiling: ``DETLOSS_COMPILE=0`` never calls ``torch.compile``; inputs
#: above the threshold then run the plain path too.
ENV_COMPILE = "DETLOSS_COMPILE"
#: Environment override of :data:`DEFAULT_MIN_NUMEL`.
ENV_MIN_NUMEL = "DETLOSS_FUSED_MIN_NUMEL"
#: Inputs with fewer elements than this take the plain path: below it a loss costs well under a
#: millisecond either way and a first call would pay the compile time for nothing.
#: 262144 elements is e.g. 3277 anchors x 80 classes, or 65536 box pairs.
DEFAULT_MIN_NUMEL = 1 << 18
#: Elements per thread in one chunk of the plain path (CPU): the temporaries of a chunk stay in
#: the core's cache, and come from the allocator's free lists instead of fresh pages. 2**17
#: float32 elements are 512 KiB, half a 1 MiB L2; with 2**16 an input of a few hundred thousand
#: elements ran about 1.2-1.8x slower (twice the chunks' per-op dispatch), large inputs the same.
PLAIN_CHUNK_PER_THREAD = 1 << 17
#: Box pairs per thread in one chunk of a box loss's plain path. A pair costs some 80 eager ops
#: on stacked tensors (a logit about ten), so counted by coordinates a chunk's dispatch cost would
#: dominate. CIoU (yolov5 form) at 200,000 pairs, AVX-512, three alternating runs against
#: ultralytics' bbox_iou (17.2-19.2 ms): 14.6-18.5 ms in chunks of 65536 pairs per thread,
#: 13.7-16.1 ms in 32768, 15.6-19.3 ms in 16384 (more chunks' dispatch) and 24.7 ms in 8192.
PLAIN_PAIRS_PER_THREAD = 1 << 15

ClosedForm = Callable[..., Tuple[torch.Tensor, torch.Tensor]]
Formula = Callable[..., torch.Tensor]
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


# ---------------------------------------------------------------------------------------------
# torch.func transforms
# ---------------------------------------------------------------------------------------------


def is_functorch_wrapped(t: object) -> bool:
    """Whether ``t`` is a tensor wrapped by a ``torch.func`` transform (grad, vmap, ...)."""
    if not isinstance(t, torch.Tensor):
        return False
    try:
        return bool(torch._C._functorch.is_functorch_wrapped_tensor(t))
    except AttributeError:  # pragma: no cover - private API moved
        return False


def unwrap_functorch(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor beneath every ``torch.func`` wrapper of ``t`` (``t`` itself when there is
    none). Under ``vmap`` it holds every batch entry, so value checks can read it."""
    while is_functorch_wrapped(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def under_vmap(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether one of ``tensors`` is batched by ``torch.func.vmap`` (at any level of wrapping)."""
    for t in tensors:
        while is_functorch_wrapped(t):
            if torch._C._functorch.is_batchedtensor(t):
                return True
            t = torch._C._functorch.get_unwrapped(t)
    return False


def worth_fusing(numel: int, *tensors: torch.Tensor) -> bool:
    """The switches every fused or compiled path shares: the fused path is on (``DETLOSS_FUSED``
    is not ``0``), the work has at least :func:`min_numel` elements, and the call is not being
    traced by an outer ``torch.compile`` or a ``torch.func`` transform of any of ``tensors``
    (those fuse or batch the plain formula themselves)."""
    if not fused_enabled() or numel < min_numel():
        return False
    return not (torch.compiler.is_compiling() or any(is_functorch_wrapped(t) for t in tensors))


def use_fused(input: torch.Tensor, *others: Optional[torch.Tensor]) -> bool:
    """Whether a loss on ``input`` (logits or predicted boxes) runs its compiled pass.

    True when autograd needs the gradient (grad mode on and ``input.requires_grad``), none of
    ``others`` (targets, weights) requires a gradient (those take the plain path, whose backward
    differentiates the formula for them), and :func:`worth_fusing` holds for ``input``'s elements
    (fused path on, at least :func:`min_numel` of them, not traced or transformed).
    """
    if not isinstance(input, torch.Tensor) or not input.requires_grad or not torch.is_grad_enabled():
        return False
    if any(o is not None and o.requires_grad for o in others):
        return False
    return worth_fusing(input.numel(), input)


# ---------------------------------------------------------------------------------------------
# Errors of torch.compile (fallback) versus errors of a call (propagated)
# ---------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def compile_error_types() -> Tuple[type, ...]:
    """The exceptions that mean "this pass could not be compiled here": Dynamo's and Inductor's
    own (no C++ compiler or Triton, unsupported operator, codegen or build failure, a backend
    failure), and failures to load what was built. Anything else raised by a compiled call, an
    out-of-memory error for one, is an error of that call and propagates."""
    types_: List[type] = [ImportError, OSError]
    try:
        from torch._dynamo.exc import TorchDynamoException

        types_.append(TorchDynamoException)
    except ImportError:  # pragma: no cover - no Dynamo
        pass
    try:
        from torch._inductor import exc as inductor_exc

        for name in ("CppCompileError", "InvalidCxxCompiler", "OperatorIssue", "CppWrapperCodegenError",
                     "SubgraphLoweringException"):
            cls = getattr(inductor_exc, name, None)
            if isinstance(cls, type):
                types_.append(cls)
    except ImportError:  # pragma: no cover - no Inductor
        pass
    return tuple(types_)


def _fresh_code(fn: Callable, tag: str) -> Callable:
    """A copy of ``fn`` with its own code object.

    torch.compile keeps its cache (and its recompile limit) per code object; every configuration
    (loss, reduction, hyperparameters) gets its own, so that configurations never evict each other.
    """
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    fresh = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    fresh.__kwdefaults__ = fn.__kwdefaults__
    return fresh


# ---------------------------------------------------------------------------------------------
# Passes
# ---------------------------------------------------------------------------------------------


def _cast(tensors: Sequence[Optional[torch.Tensor]], dtype: torch.dtype) -> List[Optional[torch.Tensor]]:
    return [t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors]  # skip no-op casts


def _reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"sum"`` / ``"mean"`` (the mean of nothing is 0) / ``"none"``."""
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / max(loss.numel(), 1)
    return loss


def make_pass(closed_form: ClosedForm, reduction: str, **params) -> Callable:
    """The whole-tensor pass ``(input, *tensors) -> (loss, grad)`` of one loss configuration.

    ``closed_form(x, *tensors, **params)`` returns the elementwise loss and its derivative in
    ``x``. Tensors are cast to the compute dtype (float32 for half precision, float64 if any is
    float64); the gradient comes in the input's dtype, or float32 for half inputs (cast after
    scaling). ``"mean"`` divides loss and gradient by the number of loss elements (the mean of
    nothing is 0). This is the function ``torch.compile`` compiles; with ``out`` the compiled loop
    stores the gradient there and returns the loss alone.
    """

    def run(input: torch.Tensor, *tensors: Optional[torch.Tensor], out: Optional[torch.Tensor] = None):
        dtype = compute_dtype(input, *tensors)
        loss, grad = closed_form(*_cast((input,), dtype), *_cast(tensors, dtype), **params)
        if reduction == "mean":
            grad = grad / max(loss.numel(), 1)
        loss = _reduce(loss, reduction)
        if out is not None:  # the compiled loop stores the gradient straight into `out`
            out.copy_(grad)
            return loss
        g_dtype = gradient_dtype(input, *tensors)
        return loss, (grad if grad.dtype == g_dtype else grad.to(g_dtype))

    return run


def make_formula(formula: Formula, reduction: str, **params) -> Callable:
    """``(input, *tensors) -> loss``: the formula of one configuration in the compute dtype, reduced
    as :func:`make_pass` reduces; differentiable in every tensor (through the casts as well)."""

    def run(input: torch.Tensor, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
        dtype = compute_dtype(input, *tensors)
        return _reduce(formula(input.to(dtype), *_cast(tensors, dtype), **params), reduction)

    return run


def _row_layout(input: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]], event_dims: int):
    """``input`` as rows that can be sliced together with the tensors broadcast against it.

    Returns ``(x_rows, rows)`` where ``x_rows`` is ``input`` reshaped to ``[R, *rest]`` and
    ``rows[i]`` is ``(tensor_i reshaped to [R or 1, *rest_i], sliced)``: the leading dimensions
    merged into R are the most (never the last ``event_dims``, e.g. a box's 4 coordinates) for
    which every tensor has, in all of them, either the input's size (``sliced``: take the same
    rows) or size 1 (broadcast to every row).
    """
    shape, d = tuple(input.shape), input.dim()
    padded = [None if t is None else t.reshape((1,) * (d - t.dim()) + tuple(t.shape)) for t in tensors]
    k = d - event_dims
    for t in padded:
        if t is None:
            continue
        full = ones = True
        for i in range(k):
            full = full and t.shape[i] == shape[i]
            ones = ones and t.shape[i] == 1
            if not (full or ones):
                k = i
                break
    r = math.prod(shape[:k])
    rows = []
    for t in padded:
        if t is None:
            rows.append((None, False))
            continue
        sliced = any(t.shape[i] != 1 for i in range(k))
        rows.append((t.reshape(((r if sliced else 1),) + tuple(t.shape[k:])), sliced))
    return input.reshape((r,) + shape[k:]), rows


def run_in_chunks(
    closed_form: ClosedForm, reduction: str, params: Dict[str, object], event_dims: int, input: torch.Tensor,
    *tensors: Optional[torch.Tensor], need_grad: bool = True, whole: Optional[Callable] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The plain path: :func:`make_pass`'s result, computed eagerly chunk by chunk.

    Eager ops read and write whole tensors; on tensors of megabytes every op streams from memory
    and every temporary is fresh memory (a page fault per 4 KiB). Cut into chunks of
    :data:`PLAIN_CHUNK_PER_THREAD` logits (:data:`PLAIN_PAIRS_PER_THREAD` box pairs) per thread (along the leading dimensions, which the
    broadcast tensors share or repeat), the closed form's temporaries stay in cache and are
    recycled by the allocator. The gradient of each chunk goes into one gradient buffer
    (:func:`empty_gradient`); ``need_grad=False`` skips it. On other devices the whole tensor is
    one chunk. ``event_dims``: trailing dimensions of ``input`` that one loss element reads (1 for
    boxes ``[..., 4]``, 0 for logits). ``whole``: the configuration's :func:`make_pass`, for inputs
    of one chunk.
    """
    dtype = compute_dtype(input, *tensors)
    # chunks count loss elements (logits, or box pairs: PLAIN_PAIRS_PER_THREAD)
    n = input.numel() // max(math.prod(input.shape[input.dim() - event_dims:]), 1) if event_dims else input.numel()
    chunk = (PLAIN_PAIRS_PER_THREAD if event_dims else PLAIN_CHUNK_PER_THREAD) * max(torch.get_num_threads(), 1)
    if input.device.type != "cpu" or n <= chunk or input.dim() <= event_dims:
        loss, grad = (whole or make_pass(closed_form, reduction, **params))(input, *tensors)
        return loss, (grad if need_grad else None)
    x_rows, rows = _row_layout(input, tensors, event_dims)
    loss_rows = x_rows.shape[: x_rows.dim() - event_dims]
    step = max(chunk // max(math.prod(x_rows.shape[1: x_rows.dim() - event_dims]), 1), 1)
    grad = empty_gradient(input, *tensors).view(x_rows.shape) if need_grad else None
    losses = torch.empty(loss_rows, dtype=dtype, device=input.device) if reduction == "none" else None
    total: Optional[torch.Tensor] = None
    scale = 1.0 / max(math.prod(loss_rows), 1) if reduction == "mean" else None
    for r0 in range(0, x_rows.shape[0], step):
        sl = slice(r0, r0 + step)
        parts = [None if t is None else (t[sl] if sliced else t) for t, sliced in rows]
        loss, g = closed_form(x_rows[sl].to(dtype), *_cast(parts, dtype), **params)
        if losses is not None:
            losses[sl] = loss
        else:
            s = loss.sum()
            total = s if total is None else total + s
        if grad is not None:
            grad[sl] = g if scale is None else g.mul_(scale)
    if losses is not None:
        out = losses.view(input.shape[: input.dim() - event_dims])
    else:
        out = total if scale is None else total * scale  # type: ignore[operator]
    return out, (None if grad is None else grad.view(input.shape))


class LossPass:
    """One loss configuration (closed form, formula, reduction, hyperparameters) and its runners.

    ``pass_(input, *tensors)`` runs the compiled pass, compiled once with
    ``torch.compile(dynamic=True)`` and reused for every shape (dynamic shapes: one kernel serves
    every batch size; hyperparameters are closure constants, so that e.g. ``gamma=2`` compiles to a
    multiplication). When compiling is off (``DETLOSS_COMPILE=0``) or the pass cannot be compiled
    here (:func:`compile_error_types`: no C++ compiler, unsupported platform), it runs
    :meth:`plain`; a compile failure warns once and is remembered. Errors of a compiled call itself
    (out of memory, say) propagate and leave the compiled pass in place.
    """

    def __init__(
        self,
        closed_form: ClosedForm,
        formula: Optional[Formula],
        reduction: str,
        params: Optional[Dict[str, object]] = None,
        tag: str = "pass",
        into_buffer: bool = True,
        options: Optional[CompileOptions] = None,
        event_dims: int = 0,
    ) -> None:
        self.closed_form = closed_form
        self.event_dims = event_dims
        self.reduction = reduction
        self.params = dict(params or {})
        self.eager = make_pass(closed_form, reduction, **self.params)
        self._formula = None if formula is None else make_formula(formula, reduction, **self.params)
        self.tag = tag
        self.into_buffer = into_buffer
        self.options = options
        #: the compiled closed form, with the fallback rule of :class:`CompiledFunction`
        self.compiled = CompiledFunction(
            self.eager, tag, options=self.compile_options, fallback=self._fallback,
            fallback_note="using the eager closed-form pass",
        )

    @property
    def failed(self) -> bool:
        """Whether compiling this pass failed here (it then runs :meth:`plain`)."""
        return self.compiled.failed

    def _fallback(self, *args: Optional[torch.Tensor], out: Optional[torch.Tensor] = None):
        """What a compile failure runs instead, returning what the compiled call would: the
        loss alone when the gradient goes into ``out``, else ``(loss, grad)``."""
        if not self.into_buffer:
            return self.plain(*args)  # type: ignore[arg-type]
        return self._plain_into(out, *args)[0]

    def compile_options(self) -> Dict[str, object]:
        """The Inductor options of this pass (a callable given as ``options`` is resolved here,
        when the pass is first compiled, so that probing the machine costs nothing otherwise)."""
        opts = self.options() if callable(self.options) else self.options
        return dict(opts or {})

    def plain(self, input: torch.Tensor, *tensors: Optional[torch.Tensor], need_grad: bool = True):
        """The plain path (:func:`run_in_chunks`): ``(loss, grad)``, ``grad`` None without ``need_grad``."""
        return run_in_chunks(
            self.closed_form, self.reduction, self.params, self.event_dims, input, *tensors, need_grad=need_grad,
            whole=self.eager,
        )

    def formula(self, input: torch.Tensor, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
        """The loss through the formula, differentiable by autograd (and batched by vmap)."""
        if self._formula is None:
            raise RuntimeError(f"detloss.kernels: {self.tag} has no differentiable formula")
        return self._formula(input, *tensors)

    def __call__(self, *args: Optional[torch.Tensor], out: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss, grad)``; with ``out`` (a tensor shaped like the input, any strides) the gradient
        is stored there and ``out`` is returned as ``grad``."""
        if not self.compiled.available():
            return self._plain_into(out, *args)
        if not self.into_buffer:
            return self.compiled(*args)
        # The compiled loop writes the gradient into a buffer allocated here (see
        # empty_gradient) instead of one Inductor allocates: same values, fewer page faults.
        if out is None:
            out = empty_gradient(*args)  # type: ignore[arg-type]
        return self.compiled(*args, out=out), out

    def _plain_into(self, out: Optional[torch.Tensor], *args: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        loss, grad = self.plain(*args)  # type: ignore[arg-type]
        if out is None:
            return loss, grad
        return loss, out.copy_(grad)


class CompiledFunction:
    """A function (no autograd) compiled once with ``torch.compile(dynamic=True)``.

    When it cannot be compiled here (:func:`compile_error_types`: no C++ compiler, unsupported
    platform) it warns once and runs ``fallback`` (default: ``fn`` itself, eagerly) from then on;
    with compiling off (``DETLOSS_COMPILE=0``) it runs ``fallback`` too. Errors of a compiled call
    itself (out of memory, say) propagate and leave the compiled function in place. ``options``:
    Inductor options, or a callable giving them when the function is first compiled.
    :class:`LossPass` holds one for its closed form.
    """

    def __init__(
        self, fn: Callable, tag: str, *, options: Optional[CompileOptions] = None,
        fallback: Optional[Callable] = None, fallback_note: str = "running it eagerly",
    ) -> None:
        self.fn = fn
        self.tag = tag
        self.options = options
        self.fallback = fn if fallback is None else fallback
        self.fallback_note = fallback_note
        self._compiled: Optional[Callable] = None
        self.failed = False

    def available(self) -> bool:
        """Whether a call runs (or first compiles) the compiled function."""
        return compile_enabled() and not self.failed

    def __call__(self, *args: Optional[torch.Tensor], **kwargs: Optional[torch.Tensor]):
        if not self.available():
            return self.fallback(*args, **kwargs)
        try:
            if self._compiled is None:
                opts = self.options() if callable(self.options) else self.options
                self._compiled = torch.compile(_fresh_code(self.fn, self.tag), dynamic=True, options=dict(opts or {}) or None)
            return self._compiled(*args, **kwargs)
        except compile_error_types() as exc:
            self.failed = True
            warnings.warn(
                f"detloss.kernels: torch.compile failed for {self.tag} ({type(exc).__name__}: {exc}); "
                f"{self.fallback_note} (set {ENV_COMPILE}=0 to skip compiling)",
                RuntimeWarning,
                stacklevel=3,
            )
        return self.fallback(*args, **kwargs)


class FusedLoss(torch.autograd.Function):
    """A loss whose forward runs a pass and keeps only its gradient; backward scales it.

    ``apply(pass_, compiled, input, *tensors) -> loss``: ``compiled`` selects the compiled pass,
    else the plain one (:class:`LossPass`). Backward multiplies the saved gradient by
    ``grad_output`` in place (it is not needed afterwards) and hands it on, so forward and backward
    together allocate one gradient-sized buffer, which becomes ``input.grad``; when the graph is
    retained and backward runs again, the gradient is recomputed from the saved inputs. Gradients
    of half-precision inputs are kept in float32 until scaled, then cast.

    The gradients of the other tensors (targets or weights that require grad) and, under
    ``create_graph=True``, the graph of the input's gradient (double backward) come from autograd
    through the pass's formula; the input's gradient keeps the closed form's value.
    :class:`FusedLossForTransforms` is the same Function written with ``setup_context``, which
    ``torch.func.grad`` needs (and which costs an argument binding per call, so plain autograd
    uses this one).
    """

    @staticmethod
    def forward(ctx, pass_: LossPass, compiled: bool, input: torch.Tensor,  # type: ignore[override]
                *tensors: Optional[torch.Tensor]) -> torch.Tensor:
        loss, grad = pass_(input, *tensors) if compiled else pass_.plain(input, *tensors)
        _setup(ctx, pass_, grad, input, tensors)
        return loss

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return (None, None) + _backward(ctx, grad_output, 2)


class FusedLossForTransforms(torch.autograd.Function):
    """:class:`FusedLoss` with ``setup_context`` (for ``torch.func.grad``): ``apply(pass_, compiled,
    slot, input, *tensors)``, where ``slot`` is a fresh :class:`_Slot` through which forward hands
    the gradient to ``setup_context`` without making it an output (which would keep a second
    reference to it)."""

    @staticmethod
    def forward(pass_: LossPass, compiled: bool, slot: "_Slot", input: torch.Tensor,  # type: ignore[override]
                *tensors: Optional[torch.Tensor]) -> torch.Tensor:
        loss, slot.grad = pass_(input, *tensors) if compiled else pass_.plain(input, *tensors)
        return loss

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pass_, _, slot, input, *tensors = inputs
        grad, slot.grad = slot.grad, None
        _setup(ctx, pass_, grad, input, tensors)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):  # type: ignore[override]
        return (None, None, None) + _backward(ctx, grad_output, 3)


def _setup(ctx, pass_: LossPass, grad: torch.Tensor, input: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]]):
    ctx.pass_ = pass_
    ctx.grad = grad
    ctx.input_dtype = input.dtype
    ctx.save_for_backward(input, *tensors)


def _backward(ctx, grad_output: torch.Tensor, first: int) -> tuple:
    """The gradients of ``(input, *tensors)``, which start at position ``first`` of ``apply``'s arguments."""
    input, *tensors = ctx.saved_tensors
    want_input = ctx.needs_input_grad[first]
    want_others = [bool(w) for w in ctx.needs_input_grad[first + 1:]]
    higher = torch.is_grad_enabled()  # backward(create_graph=True): the gradient needs a graph
    grad, ctx.grad = ctx.grad, None  # drop our reference: the engine may then reuse the buffer
    grad_input = None
    if want_input:
        if grad is None:  # a retained graph, backward again
            grad = ctx.pass_.eager(input.detach(), *_detached(tensors))[1]
        in_place = not higher and not is_functorch_wrapped(grad_output)
        grad_input = _scale(grad, grad_output, in_place)
    others: List[Optional[torch.Tensor]] = [None] * len(tensors)
    if higher or any(want_others):
        got = _formula_grads(ctx.pass_, input, tensors, grad_output, want_input and higher, want_others, higher)
        if want_input and higher:
            g = got.pop(0)
            grad_input = g + (grad_input - g).detach()  # the closed form's value, the formula's graph
        others = got
    if grad_input is not None and grad_input.dtype != ctx.input_dtype:
        grad_input = grad_input.to(ctx.input_dtype)
    return (grad_input, *others)


class _Slot:
    """Holds the gradient from :meth:`FusedLossForTransforms.forward` to its ``setup_context`` (a
    plain object, so that torch.func passes it through as it is instead of rebuilding it)."""

    __slots__ = ("grad",)

    def __init__(self) -> None:
        self.grad: Optional[torch.Tensor] = None


def _detached(tensors: Sequence[Optional[torch.Tensor]]) -> List[Optional[torch.Tensor]]:
    return [None if t is None else t.detach() for t in tensors]


def _formula_grads(
    pass_: LossPass, input: torch.Tensor, tensors: Sequence[Optional[torch.Tensor]], grad_output: torch.Tensor,
    want_input: bool, want_others: Sequence[bool], create_graph: bool,
) -> List[Optional[torch.Tensor]]:
    """Autograd through the formula: ``[d input (if want_input)] + [d tensor_i or None]``."""
    with torch.enable_grad():
        if create_graph:  # the saved tensors carry their graph: differentiate through it
            x, ts = input, list(tensors)
        else:
            x = input.detach()
            ts = [None if t is None else (t.detach().requires_grad_() if w else t.detach())
                  for t, w in zip(tensors, want_others)]
        wrt = ([x] if want_input else []) + [t for t, w in zip(ts, want_others) if w and t is not None]
        got = list(torch.autograd.grad(
            pass_.formula(x, *ts), wrt, grad_output, create_graph=create_graph, allow_unused=True
        )) if wrt else []
    out: List[Optional[torch.Tensor]] = [got.pop(0)] if want_input else []
    for t, w in zip(ts, want_others):
        out.append(got.pop(0) if w and t is not None else None)
    return out


def _scale(grad: torch.Tensor, grad_output: torch.Tensor, in_place: bool) -> torch.Tensor:
    """``grad * grad_output``, written into ``grad`` when ``in_place`` (and skipped for a CPU
    scalar ``grad_output == 1``). A per-pair ``grad_output`` ``[...]`` of a box loss scales the
    ``[..., 4]`` gradient."""
    if grad_output.dim() == 0:
        if in_place and grad_output.device.type == "cpu" and float(grad_output) == 1.0:
            return grad
    elif grad_output.dim() < grad.dim():
        grad_output = grad_output.unsqueeze(-1)
    return grad.mul_(grad_output) if in_place else grad * grad_output


def apply_pass(pass_: LossPass, compiled: bool, input: torch.Tensor, *tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """The loss of ``pass_`` on validated tensors, differentiable in every tensor.

    Under ``vmap`` or an enclosing ``torch.compile`` the formula (which they batch or fuse
    themselves); when no gradient is wanted the plain pass without a gradient buffer; else
    :class:`FusedLoss` (:class:`FusedLossForTransforms` under ``torch.func.grad``) with the
    compiled (``compiled``, see :func:`use_fused`) or the plain pass.
    """
    everything = (input,) + tensors
    if torch.compiler.is_compiling() or under_vmap(*everything):
        return pass_.formula(input, *tensors)
    wanted = torch.is_grad_enabled() and any(
        t is not None and (t.requires_grad or is_functorch_wrapped(t)) for t in everything
    )
    if not wanted:
        return pass_.plain(input, *tensors, need_grad=False)[0]
    if any(is_functorch_wrapped(t) for t in everything):
        return FusedLossForTransforms.apply(pass_, compiled, _Slot(), input, *tensors)
    return FusedLoss.apply(pass_, compiled, input, *tensors)


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


_PASSES: Dict[tuple, LossPass] = {}


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
    closed_form: ClosedForm,
    formula: Optional[Formula],
    reduction: str,
    into_buffer: bool = True,
    options: Optional[CompileOptions] = None,
    event_dims: int = 0,
    **params,
) -> LossPass:
    """The :class:`LossPass` of ``closed_form`` / ``formula`` for this reduction and
    hyperparameters, made once.

    ``into_buffer``: the compiled loop stores the gradient into :func:`empty_gradient` (for
    elementwise passes; a pass whose gradient Inductor assembles from parts, like the box losses'
    ``[..., 4]``, would copy it there instead, so it keeps its own output). ``options``: Inductor
    options for this pass (see :func:`inductor_options`). ``event_dims``: see :func:`run_in_chunks`."""
    key = (name, reduction) + tuple(sorted(params.items()))
    lp = _PASSES.get(key)
    if lp is None:
        tag = "_".join([name, reduction] + [f"{k}{v}" for k, v in sorted(params.items())])
        tag = "".join(c if c.isalnum() else "_" for c in tag)
        lp = LossPass(closed_form, formula, reduction, params, tag, into_buffer, options, event_dims)
        _PASSES[key] = lp
    return lp
