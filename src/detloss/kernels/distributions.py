r"""The box decoding of distribution-focal heads (YOLOv8 / YOLO11), read straight from the head maps.

A level's head map ``[B, C, n]`` (``n = H * W`` cells, channel ``k * R + j`` bin ``j`` of side
``k`` in the order left, top, right, bottom, ``R = reg_max``) gives each cell four distances, the
expectations of the sides' softmax distributions, and the xyxy box around the cell's anchor point
``(a_x, a_y)`` (ultralytics ``bbox_decode`` + ``dist2bbox``):

.. math::
    d_k = \frac{\sum_j j\,e^{x_{kj} - m_k}}{\sum_j e^{x_{kj} - m_k}},\quad m_k = \max_j x_{kj},
    \qquad \text{box} = (a_x - d_0,\ a_y - d_1,\ a_x + d_2,\ a_y + d_3)

:func:`decode_head_maps` computes this for every cell of every level in one compiled loop
(:func:`torch.compile`, dynamic shapes) over the maps' own layout, the bins of a side ``n`` apart,
without the transposed copy and the ``[B, n, 4, R]`` softmax that the reference's ``softmax(-1)
.matmul(proj)`` makes. The value is the same expectation; it is summed in another order than the
softmax-then-matmul of :func:`detloss.losses.yolov8.decode_distances`, so the two differ by a few
ulps. It runs without gradient: it is what the task-aligned assigner reads, and the positives'
boxes are decoded again, with gradient, from their own rows.

When compiling is switched off (``DETLOSS_FUSED=0`` or ``DETLOSS_COMPILE=0``) callers use the plain
decoding (:func:`use_compiled_decode` says which); when the compile fails, this module's formula
runs eagerly (:class:`~detloss.kernels._runtime.CompiledFunction`).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import torch
from torch import Tensor

from ._runtime import CompiledFunction, compile_enabled, worth_fusing

__all__ = ["decode_head_maps", "use_compiled_decode"]


def _level_boxes(m: Tensor, points: Tensor, reg_max: int) -> Tensor:
    """``[B, n, 4]`` xyxy boxes of one level's map ``m [B, C, n]`` around ``points [n, 2]``."""
    b, _, n = m.shape
    x = m[:, : 4 * reg_max].view(b, 4, reg_max, n)
    e = torch.exp(x - x.amax(2, keepdim=True))
    proj = torch.arange(reg_max, dtype=m.dtype, device=m.device)
    d = (e * proj[:, None]).sum(2) / e.sum(2)  # [B, 4, n]
    p = points.t()[None]  # [1, 2, n]
    return torch.cat((p - d[:, :2], p + d[:, 2:]), 1).transpose(1, 2)


def _decoder(reg_max: int, levels: int) -> Callable[..., Tensor]:
    def decode(*args: Tensor) -> Tensor:
        maps, points = args[:levels], args[levels:]
        return torch.cat([_level_boxes(m, p, reg_max) for m, p in zip(maps, points)], 1)

    return decode


_DECODERS: Dict[Tuple[int, int], CompiledFunction] = {}


def use_compiled_decode(maps: Sequence[Tensor]) -> bool:
    """Whether :func:`decode_head_maps` runs compiled for these maps: compiling on, floating maps,
    and :func:`~detloss.kernels._runtime.worth_fusing` for their elements (fused path on, at least
    :func:`~detloss.kernels.min_numel` of them, not under an enclosing ``torch.compile`` or a
    ``torch.func`` transform)."""
    if not maps or not compile_enabled() or not maps[0].is_floating_point():
        return False
    return worth_fusing(sum(m.numel() for m in maps), *maps)


def decode_head_maps(maps: Sequence[Tensor], points: Sequence[Tensor], reg_max: int) -> Tensor:
    """``[B, A, 4]`` xyxy boxes (the anchor points' units) of every cell of ``maps`` (``[B, C, n_l]``
    per level, ``C >= 4 * reg_max``, one dtype) around ``points`` (``[n_l, 2]`` per level), levels in
    order; no gradient. Compiled once per ``(reg_max, number of levels)``; falls back to the same
    formula run eagerly when the compile fails (:class:`~detloss.kernels._runtime.CompiledFunction`)."""
    key = (int(reg_max), len(maps))
    fn = _DECODERS.get(key)
    if fn is None:
        fn = _DECODERS[key] = CompiledFunction(_decoder(*key), f"dfl_decode_r{key[0]}_l{key[1]}")
    with torch.no_grad():
        return fn(*maps, *points)
