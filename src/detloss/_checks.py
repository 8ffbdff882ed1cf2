"""Input checks, reductions and precision handling shared by every loss.

Every error names the argument, what was expected and what came.
"""
from __future__ import annotations

import contextlib
import math
from typing import ContextManager, Optional, Sequence, Tuple

import torch

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {tuple(choices)}, got {value!r}")
    return value


def check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def check_floating(name: str, value: object) -> torch.Tensor:
    t = check_tensor(name, value)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    return t


def check_finite(names: Sequence[str], tensors: Sequence[torch.Tensor]) -> None:
    """Every tensor of ``tensors`` holds finite values only; the error names the first offending
    tensor (its entry of ``names``) and index. One device synchronization for all of them.

    The test is one sum per tensor (in float32, or float64 for float64 tensors): a NaN or inf
    entry always makes it non-finite, and a sum that overflows although every entry is finite
    only sends the check to the exact per-element test, so the answer is exact and the usual
    case costs one reduction (a quarter of an ``isfinite(t).all()`` pass on CPU)."""
    sums = [torch.isfinite(t.detach().sum(dtype=compute_dtype(t))) for t in tensors]
    if not sums or bool(torch.stack(sums).all()):
        return
    for name, t in zip(names, tensors):
        bad = ~torch.isfinite(t.detach())
        if bool(bad.any()):
            where = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{name}: expected finite values, got {float(t.detach()[where])} at index {where}")


def check_level_sizes(name: str, sizes: Sequence[Tuple[int, int]], strides: Sequence[float]) -> None:
    """Feature-map sizes ``(H_l, W_l)`` of a pyramid with ``strides`` must come from one image
    size: some ``H`` with ``H_l = ceil(H / s_l)`` at every level (a stride-2 convolution with
    padding), or ``H_l = floor(H / s_l)`` at every level (pooling), and the same for ``W``."""
    for axis, what in ((0, "H"), (1, "W")):
        n = [float(size[axis]) for size in sizes]
        ceil_ok = max((v - 1) * s for v, s in zip(n, strides)) < min(v * s for v, s in zip(n, strides))
        floor_ok = max(v * s for v, s in zip(n, strides)) < min((v + 1) * s for v, s in zip(n, strides))
        if not (ceil_ok or floor_ok):
            h0, w0 = (sizes[0][0] * strides[0], sizes[0][1] * strides[0])
            expect = [(math.ceil(h0 / s), math.ceil(w0 / s)) for s in strides]
            raise ValueError(
                f"{name}: expected level sizes that one image size gives at strides {tuple(strides)} (each "
                f"level about image / stride), got {[tuple(size) for size in sizes]}: their {what} fits no "
                f"single image (level 0's {h0:g} x {w0:g} image gives {expect})"
            )


def _autocast_enabled(device_type: str) -> bool:
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4: no device_type argument
        return bool(torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled())


def autocast_off() -> ContextManager[None]:
    """A context that turns an enclosing ``torch.autocast`` (CPU or CUDA) off, so that what a
    loss has upcast to float32 stays float32 in every op, matmul included (autocast would run
    it in bfloat16 / float16). Enters nothing when autocast is off."""
    stack = contextlib.ExitStack()
    for device_type in ("cpu", "cuda"):
        if _autocast_enabled(device_type):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
    return stack


def check_like_first(name: str, t: torch.Tensor, first_name: str, first: torch.Tensor) -> None:
    """One level of a multi-level input has the first level's batch size (dim 0) and device."""
    if t.shape[0] != first.shape[0]:
        raise ValueError(f"{name}: expected batch size {first.shape[0]} as {first_name}, got {t.shape[0]}")
    if t.device != first.device:
        raise ValueError(f"{name}: expected device {first.device} as {first_name}, got {t.device}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_b}: expected the same shape as {name_a} {tuple(a.shape)}, got {tuple(b.shape)}"
        )


def broadcasts_to(shape: Sequence[int], to: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` broadcasts to ``to`` without changing ``to``, in plain Python
    (``torch.broadcast_shapes`` imports sympy on its first call, a stall of seconds)."""
    if len(shape) > len(to):
        return False
    return all(a == 1 or a == b for a, b in zip(reversed(tuple(shape)), reversed(tuple(to))))


def check_broadcastable_to(name: str, value: torch.Tensor, shape: torch.Size, to_name: str) -> None:
    """``value`` must broadcast to ``shape`` without changing ``shape`` (no silent growth)."""
    if not broadcasts_to(value.shape, shape):
        raise ValueError(
            f"{name}: expected a shape broadcastable to {to_name} {tuple(shape)}, got {tuple(value.shape)}"
        )


def compute_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """float32 for half-precision inputs, else the widest floating dtype among the inputs."""
    dtype = torch.float32
    for t in tensors:
        if t is not None and t.is_floating_point() and t.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def upcast(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Cast to ``dtype`` (the compute dtype); the cast is differentiable, so gradients come
    back to the caller in the input's own dtype."""
    if t is None:
        return None
    return t.to(dtype) if t.dtype != dtype else t


def reduce_loss(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply a torch.nn.functional reduction ("none" | "mean" | "sum")."""
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def as_pair(name: str, value: object) -> Tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    try:
        a, b = value  # type: ignore[misc]
        return (int(a), int(b))
    except Exception:
        raise ValueError(f"{name}: expected an int or a pair (h, w), got {value!r}") from None
