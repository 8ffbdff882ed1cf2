"""Point grids of dense heads and candidate windows over them, shared by assigners and losses.

A dense head predicts at the points of a grid per pyramid level. Every loss here lays the points
of all levels out the same way: level by level, each level row-major (``y`` then ``x``), so a
prediction's index ``p`` in ``0 .. A-1`` names one point of one level:

- :func:`grid_points`: the points' coordinates, ``((x + offset) * sx, (y + offset) * sy)``;
  ultralytics and mmdetection put them at cell centres (``offset=0.5``), torchvision's
  AnchorGenerator at cell corners (``offset=0``);
- :func:`make_anchors`: ultralytics' ``make_anchors`` (points in grid units and their strides);
- :func:`per_point`: one value per level repeated over the level's points (strides, level index);
- :func:`window_cells`: every cell of a rectangle of cell indices, for many rectangles at once:
  the candidate enumeration of the assigners that visit only the cells near each box instead of
  building a boxes x points mask (:mod:`detloss.assign.tal`, :mod:`detloss.assign.fcos`);
- :class:`GridLevel` and :func:`locate`: where a prediction index lies on the image (level,
  anchor slot, cell, point), for heads with several anchors per cell too
  (:meth:`detloss.losses.base.DetectionLoss.prediction_levels`).

No loop over boxes or points; a loop over levels only.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["Level", "GridLevel", "grid_points", "locate", "make_anchors", "per_point", "window_cells"]

#: ``(h, w, stride)`` of one pyramid level.
Level = Tuple[int, int, float]


def grid_points(
    sizes: Sequence[Tuple[int, int]],
    spacings: Sequence[Tuple[float, float]],
    *,
    offset: float = 0.5,
    dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
) -> Tensor:
    """Points ``[A, 2]`` (x, y) of grids ``sizes`` (``(h, w)`` per level) with ``spacings``
    (``(sx, sy)`` per level): ``((x + offset) * sx, (y + offset) * sy)``, level by level, each
    level row-major. ``A`` is the sum of ``h * w``."""
    pts = []
    for (h, w), (sx, sy) in zip(sizes, spacings):
        xs = (torch.arange(w, dtype=dtype, device=device) + offset) * sx
        ys = (torch.arange(h, dtype=dtype, device=device) + offset) * sy
        pts.append(torch.stack((xs.repeat(h), ys.repeat_interleave(w)), -1))
    return torch.cat(pts) if pts else torch.zeros((0, 2), dtype=dtype, device=device)


def per_point(
    values: Sequence[float], sizes: Sequence[Tuple[int, int]], *, dtype: torch.dtype, device: Optional[torch.device] = None
) -> Tensor:
    """``[A]``: ``values[l]`` repeated over the ``h * w`` points of level ``l`` (strides, level index)."""
    counts = [h * w for h, w in sizes]
    return torch.repeat_interleave(torch.tensor(list(values), dtype=dtype, device=device),
                                   torch.tensor(counts, device=device), output_size=sum(counts))


#: Grids :func:`make_anchors` keeps (the most recent ones; a training run uses one or a few sizes).
ANCHOR_CACHE_SIZE = 8
_ANCHOR_CACHE: "OrderedDict[tuple, Tuple[Tensor, Tensor, int, int]]" = OrderedDict()


def make_anchors(levels: Sequence[Level], dtype: torch.dtype, device: Optional[torch.device] = None) -> Tuple[Tensor, Tensor]:
    """Anchor points ``[A, 2]`` in grid units ``(x + 0.5, y + 0.5)`` and their strides ``[A, 1]``
    (ultralytics ``make_anchors`` with offset 0.5). Times the strides they are the points in
    pixels, to the last bit of ``grid_points(..., spacings=strides)``.

    The last :data:`ANCHOR_CACHE_SIZE` grids are kept and the same tensors returned again (they
    cost about twenty small ops to build); one that was modified in place is built anew. Under
    ``torch.inference_mode`` or a ``torch.compile`` trace they are built every time."""
    key = (tuple((int(h), int(w), float(s)) for h, w, s in levels), dtype, torch.device(device or "cpu"))
    # inference tensors keep no version counter (and may not be used with autograd): not cached
    traced = torch.compiler.is_compiling() or torch.is_inference_mode_enabled()
    hit = None if traced else _ANCHOR_CACHE.get(key)
    if hit is not None and hit[0]._version == hit[2] and hit[1]._version == hit[3]:
        _ANCHOR_CACHE.move_to_end(key)
        return hit[0], hit[1]
    sizes = [(h, w) for h, w, _ in levels]
    points = grid_points(sizes, [(1.0, 1.0)] * len(sizes), dtype=dtype, device=device)
    strides = per_point([float(s) for _, _, s in levels], sizes, dtype=dtype, device=device)[:, None]
    if not traced:
        _ANCHOR_CACHE[key] = (points, strides, points._version, strides._version)
        while len(_ANCHOR_CACHE) > ANCHOR_CACHE_SIZE:
            _ANCHOR_CACHE.popitem(last=False)
    return points, strides


def window_cells(start: Tensor, count: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Every cell of ``K`` rectangles of cell indices, flat.

    ``start`` int64 ``[K, 2]`` is the first ``(x, y)`` index of each rectangle, ``count`` int64
    ``[K, 2]`` its number of columns and rows (negative counts are empty). Returns ``(rect, ix,
    iy)``, each int64 ``[T]`` with ``T`` the total number of cells: rectangle by rectangle, each
    row-major. One host synchronization (``T``); memory ``O(T)``.
    """
    count = count.clamp(min=0)
    per_rect = count[:, 0] * count[:, 1]
    total = int(per_rect.sum())
    dev = start.device
    rect = torch.repeat_interleave(torch.arange(per_rect.numel(), device=dev), per_rect, output_size=total)
    t = torch.arange(total, device=dev) - (torch.cumsum(per_rect, 0) - per_rect)[rect]
    nx = count[rect, 0]
    ix = start[rect, 0] + t % nx
    iy = start[rect, 1] + torch.div(t, nx, rounding_mode="floor")
    return rect, ix, iy


@dataclass
class GridLevel:
    """How one level's predictions lie on the image: ``num_anchors * ny * nx`` predictions laid
    out ``[anchor slot, ny, nx]`` (``[ny, nx, anchor slot]`` with ``slot_last``: torchvision's
    heads), the point of cell ``(gy, gx)`` at ``((gx + offset) * sx, (gy + offset) * sy)`` pixels.
    ``anchors``: the slots' ``(w, h)`` in pixels, or None for one prediction per point
    (anchor-free heads)."""

    stride: float
    grid: Tuple[int, int]
    spacing: Tuple[float, float]
    offset: float = 0.5
    anchors: Optional[List[Tuple[float, float]]] = None
    slot_last: bool = False

    @property
    def num_preds(self) -> int:
        return (1 if self.anchors is None else len(self.anchors)) * self.grid[0] * self.grid[1]


def locate(levels: Sequence[GridLevel], pred_index: Tensor) -> Dict[str, Tensor]:
    """Where predictions ``pred_index`` (int64 ``[P]``, levels concatenated) lie: int64 ``level``,
    ``anchor`` (slot in its level, 0 for anchor-free levels), ``gy``, ``gx`` and float64 ``x``,
    ``y`` (the cell's point in pixels), each ``[P]``."""
    sizes = torch.tensor([lv.num_preds for lv in levels], device=pred_index.device)
    ends = torch.cumsum(sizes, 0)
    level = torch.searchsorted(ends, pred_index, right=True)
    local = pred_index - (ends - sizes)[level]
    ny = torch.tensor([lv.grid[0] for lv in levels], device=pred_index.device)[level]
    nx = torch.tensor([lv.grid[1] for lv in levels], device=pred_index.device)[level]
    slots = torch.tensor([1 if lv.anchors is None else len(lv.anchors) for lv in levels], device=pred_index.device)[level]
    last = torch.tensor([lv.slot_last for lv in levels], device=pred_index.device)[level]
    cell = torch.where(last, torch.div(local, slots, rounding_mode="floor"), local % (ny * nx))
    anchor = torch.where(last, local % slots, torch.div(local, ny * nx, rounding_mode="floor"))
    gy, gx = torch.div(cell, nx, rounding_mode="floor"), cell % nx
    f64 = dict(dtype=torch.float64, device=pred_index.device)
    offset = torch.tensor([lv.offset for lv in levels], **f64)[level]
    sx = torch.tensor([lv.spacing[0] for lv in levels], **f64)[level]
    sy = torch.tensor([lv.spacing[1] for lv in levels], **f64)[level]
    return {
        "level": level,
        "anchor": anchor,
        "gy": gy,
        "gx": gx,
        "x": (gx + offset) * sx,
        "y": (gy + offset) * sy,
    }
