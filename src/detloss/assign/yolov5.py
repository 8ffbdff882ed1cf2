"""YOLOv5 target assignment (ultralytics/yolov5 v7.0, ``utils/loss.py`` ``ComputeLoss.build_targets``).

For every pyramid level, a target row ``(image, class, cx, cy, w, h)`` (normalized 0..1) is

1. scaled to the level's grid: ``gxy = (cx, cy) * (nx, ny)``, ``gwh = (w, h) * (nx, ny)``;
2. matched to every anchor ``a`` of the level whose width/height ratio is small enough::

       r = gwh / anchor_a          (anchors in grid units: pixels / stride)
       match  <=>  max(r, 1 / r).max() < anchor_t          (hyp ``anchor_t``, default 4.0)

3. placed in its own cell and in the two nearest neighbour cells: with ``g = 0.5`` the left
   neighbour is used when ``gx % 1 < g and gx > 1``, the upper when ``gy % 1 < g and gy > 1``,
   the right when ``(nx - gx) % 1 < g and nx - gx > 1``, the lower likewise in y. The cell is
   ``gij = floor(gxy - offset)`` with offsets ``0, (+g, 0), (0, +g), (-g, 0), (0, -g)``, clamped to
   the grid; the regression target is ``(gxy - gij, gwh)``, relative to that (clamped) cell, as
   in the original where the in-place clamp also changes ``gij``.

The positives come out in the original's order: offset-major (own cell, left, up, right, down),
then anchor, then target row. Several positives may share one (image, anchor, cell); the
original writes ``tobj[b, a, gj, gi] = iou`` in that order and, on CPU, the value written last
wins. :attr:`YOLOv5LevelAssignment.obj_owner` marks, for each positive, whether it is that last
writer, so a loss can reproduce the rule exactly and deterministically on any device.

:func:`assign_yolov5` returns a :class:`YOLOv5Assignment`: the flat positives of all levels (an
:class:`~detloss.assign.base.Assignment`) that is also the list of the levels'
:class:`YOLOv5LevelAssignment`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..boxes import check_yolo_targets
from .base import PerLevelAssignment, cell_index, rank_in_group

__all__ = [
    "YOLOv5Assignment",
    "YOLOv5LevelAssignment",
    "assign_yolov5",
    "check_yolo_targets",
    "grid_anchors",
    "NEIGHBOUR_BIAS",
    "OFFSET_NAMES",
]

#: ``g`` in ``build_targets``: how far (in cells) from a cell border a centre may be for the
#: neighbour cell across that border to become a positive too.
NEIGHBOUR_BIAS = 0.5

#: What :attr:`YOLOv5LevelAssignment.offset` means, in order.
OFFSET_NAMES = ("own", "left", "up", "right", "down")

# (x, y) offsets subtracted from the grid centre, times NEIGHBOUR_BIAS (build_targets' ``off``).
_OFFSETS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))


@dataclass
class YOLOv5LevelAssignment:
    """The positives of one pyramid level, in ``build_targets``' order (``n`` of them).

    Attributes:
        image: ``[n]`` int64, image index in the batch (``b`` in the original).
        anchor: ``[n]`` int64, anchor index within the level (``a``).
        gy, gx: ``[n]`` int64, the cell row and column (``gj``, ``gi``), clamped to the grid.
        boxes: ``[n, 4]`` regression targets ``(x, y, w, h)`` in grid units, x and y relative to
            the cell's top-left corner (``tbox``); between -0.5 and 1.5 for x and y.
        anchors: ``[n, 2]`` the matched anchor's (w, h) in grid units (``anch``).
        classes: ``[n]`` int64 class of the target (``tcls``).
        target_index: ``[n]`` int64, the row of the input ``targets`` this positive came from.
        offset: ``[n]`` int64, index into :data:`OFFSET_NAMES` (0 = the centre's own cell).
        obj_owner: ``[n]`` bool, True for the positive whose IoU is the objectness target of its
            (image, anchor, cell): the last one in this order (``tobj[b, a, gj, gi] = iou``).
        grid_size: ``(ny, nx)`` of the level.
    """

    image: torch.Tensor
    anchor: torch.Tensor
    gy: torch.Tensor
    gx: torch.Tensor
    boxes: torch.Tensor
    anchors: torch.Tensor
    classes: torch.Tensor
    target_index: torch.Tensor
    offset: torch.Tensor
    obj_owner: torch.Tensor
    grid_size: Tuple[int, int]

    @property
    def num_pos(self) -> int:
        return int(self.image.shape[0])

    def indices(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(image, anchor, gy, gx)``, ready to index a ``[bs, na, ny, nx, ...]`` head output."""
        return self.image, self.anchor, self.gy, self.gx


class YOLOv5Assignment(PerLevelAssignment):
    """What :func:`assign_yolov5` returns: the positives of every level, level after level, each
    level in ``build_targets``' order; also the list of the levels' :class:`YOLOv5LevelAssignment`
    (``assignment[i]``, ``len``, iteration).

    ``pred_index``: the cell of ``preds[i]`` ``[bs, na, ny, nx, ...]`` flattened per level, levels
    concatenated (``offset_i + (anchor * ny + gy) * nx + gx``); ``target_index`` the row of
    ``targets``; ``boxes`` the regression targets ``(x, y, w, h)`` in grid units, x and y relative
    to the cell (``tbox``); ``labels`` the classes; ``weights`` ones. ``extras``: ``levels`` (the
    per-level results), ``level`` (int64 ``[P]``), ``anchors`` (``[P, 2]`` matched anchor in grid
    units), ``offset`` (neighbour offset, :data:`OFFSET_NAMES`), ``obj_owner`` (bool ``[P]``: the
    positive whose IoU is its cell's objectness target).
    """


def grid_anchors(
    anchors: Sequence[Sequence[float]], strides: Sequence[float], dtype: torch.dtype = torch.float64
) -> List[torch.Tensor]:
    """yolov5-yaml anchors (per level, flat ``w0, h0, w1, h1, ...`` in pixels) -> per level a
    ``[na, 2]`` tensor in grid units (pixels / stride), as ``Model`` stores them in ``Detect``."""
    if len(anchors) != len(strides):
        raise ValueError(
            f"anchors: expected one entry per stride ({len(strides)} strides), got {len(anchors)} levels"
        )
    out = []
    for i, (a, s) in enumerate(zip(anchors, strides)):
        t = torch.as_tensor(a, dtype=dtype).reshape(-1)
        if t.numel() == 0 or t.numel() % 2:
            raise ValueError(f"anchors: level {i} expected an even number of values (w, h pairs), got {t.numel()}")
        if not bool(torch.isfinite(t).all()) or bool((t <= 0).any()):
            raise ValueError(f"anchors: level {i} expected positive finite sizes, got {a!r}")
        if not float(s) > 0:
            raise ValueError(f"strides: level {i} expected a positive stride, got {s!r}")
        out.append(t.view(-1, 2) / float(s))
    na = {t.shape[0] for t in out}
    if len(na) != 1:
        raise ValueError(f"anchors: expected the same number of anchors on every level, got {[t.shape[0] for t in out]}")
    return out


def _last_writers(key: torch.Tensor, num_keys: Optional[int]) -> torch.Tensor:
    """``[n]`` bool, True at the last occurrence of each value of ``key`` (the value an indexed
    write ``t[key] = v`` keeps when it runs in order). With ``num_keys`` (a bound on ``key``) one
    scatter of the positions (the largest per key); without it two stable sorts
    (:func:`~detloss.assign.base.rank_in_group`)."""
    if num_keys is None:
        return rank_in_group(key) == 0
    pos = torch.arange(key.shape[0], device=key.device)
    last = torch.full((num_keys,), -1, dtype=pos.dtype, device=key.device).scatter_reduce_(0, key, pos, "amax")
    return last[key] == pos


def _assign_level(
    targets: torch.Tensor, grid_size: Tuple[int, int], anchors: torch.Tensor, anchor_t: float,
    batch_size: Optional[int] = None,
) -> YOLOv5LevelAssignment:
    ny, nx = grid_size
    dev, dtype = targets.device, targets.dtype
    na = anchors.shape[0]
    gain = torch.tensor([nx, ny], dtype=dtype, device=dev)
    # (x, y, w, h) in grid units; the gathers below are index_select (rows of one tensor at a
    # time), several times cheaper on the CPU than advanced indexing
    gxywh_all = targets[:, 2:6] * gain.repeat(2)

    # Anchor matching by width/height ratio; nonzero() is row-major, i.e. anchor-major then
    # target, the order of ``targets.repeat(na, 1, 1)[j]`` in the original.
    r = gxywh_all[None, :, 2:4] / anchors[:, None]
    match = torch.max(r, 1 / r).max(2)[0] < anchor_t  # [na, nt]
    a_idx, t_idx = match.nonzero(as_tuple=True)
    gxy = gxywh_all.index_select(0, t_idx)[:, 0:2]

    # Neighbour cells (the two nearest), offset-major as ``t.repeat((5, 1, 1))[j]``.
    g = NEIGHBOUR_BIAS
    gxi = gain - gxy
    j, k = ((gxy % 1 < g) & (gxy > 1)).T
    l, m = ((gxi % 1 < g) & (gxi > 1)).T
    sel = torch.stack((torch.ones_like(j), j, k, l, m))
    o_idx, p_idx = sel.nonzero(as_tuple=True)
    off = torch.tensor(_OFFSETS, dtype=dtype, device=dev) * g

    tix = t_idx.index_select(0, p_idx)
    a = a_idx.index_select(0, p_idx)
    gxywh = gxywh_all.index_select(0, tix)
    gxy, gwh = gxywh[:, 0:2], gxywh[:, 2:4]
    gij = (gxy - off.index_select(0, o_idx)).long()
    gx = gij[:, 0].clamp(0, nx - 1)
    gy = gij[:, 1].clamp(0, ny - 1)
    image_class = targets[:, 0:2].index_select(0, tix).long()
    image = image_class[:, 0]
    boxes = torch.cat((gxy - torch.stack((gx, gy), 1).to(dtype), gwh), 1)
    key = ((image * na + a) * ny + gy) * nx + gx
    return YOLOv5LevelAssignment(
        image=image,
        anchor=a,
        gy=gy,
        gx=gx,
        boxes=boxes,
        anchors=anchors.index_select(0, a),
        classes=image_class[:, 1],
        target_index=tix,
        offset=o_idx,
        obj_owner=_last_writers(key, None if batch_size is None else batch_size * na * ny * nx),
        grid_size=(int(ny), int(nx)),
    )


def assign_yolov5(
    targets: torch.Tensor,
    grid_sizes: Sequence[Tuple[int, int]],
    anchors: Sequence[torch.Tensor],
    anchor_t: float = 4.0,
    *,
    num_classes: Optional[int] = None,
    batch_size: Optional[int] = None,
    validate: bool = True,
) -> YOLOv5Assignment:
    """YOLOv5's target assignment (``ComputeLoss.build_targets`` of ultralytics/yolov5 v7.0).

    Args:
        targets: ``[N, 6]`` rows ``(image_index, class, cx, cy, w, h)`` normalized to 0..1.
            Computed in the targets' dtype (float32 for half precision), as the original does.
        grid_sizes: per level ``(ny, nx)``, e.g. ``preds[i].shape[2:4]``.
        anchors: per level a ``[na, 2]`` tensor of anchor (w, h) in grid units of that level
            (pixels / stride; :func:`grid_anchors` converts yolov5-yaml anchors).
        anchor_t: width/height ratio threshold (hyp ``anchor_t``).
        num_classes, batch_size: when given, classes and image indices are checked against them
            (``batch_size`` also sizes the assignment; default: the largest image index + 1).
        validate: check ``targets`` (see :func:`check_yolo_targets`); turn off only for rows
            already checked.

    Returns:
        A :class:`YOLOv5Assignment`, which is also one :class:`YOLOv5LevelAssignment` per level:
        the positives' ``(image, anchor, gy, gx)``,
        their regression targets, anchors, classes, the target row each came from, the
        neighbour offset used and which positive owns the objectness target of its cell
        (the last written, see the module docstring).
    """
    if validate:
        targets = check_yolo_targets(targets, num_classes, batch_size)
    if len(grid_sizes) != len(anchors):
        raise ValueError(
            f"grid_sizes: expected one (ny, nx) per anchor level ({len(anchors)} levels), got {len(grid_sizes)}"
        )
    if not grid_sizes:
        raise ValueError("grid_sizes: expected at least one level, got none")
    if not anchor_t > 0:
        raise ValueError(f"anchor_t: expected a positive ratio threshold, got {anchor_t!r}")
    if targets.dtype in (torch.float16, torch.bfloat16):
        targets = targets.float()
    out = []
    for size, anc in zip(grid_sizes, anchors):
        ny, nx = (int(s) for s in size)
        anc = anc.to(device=targets.device, dtype=targets.dtype)
        if anc.ndim != 2 or anc.shape[1] != 2:
            raise ValueError(f"anchors: expected a [na, 2] tensor per level, got {tuple(anc.shape)}")
        out.append(_assign_level(targets, (ny, nx), anc, float(anchor_t), batch_size))
    if batch_size is None:
        batch_size = int(targets[:, 0].max()) + 1 if targets.shape[0] else 0
    return _flatten(out, [int(a.shape[0]) for a in anchors], batch_size)


def _flatten(levels: List[YOLOv5LevelAssignment], num_anchors: List[int], batch_size: int) -> YOLOv5Assignment:
    """The levels' positives, flat, level after level."""
    shapes = [(na, *lvl.grid_size) for na, lvl in zip(num_anchors, levels)]

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(lvl, name) for lvl in levels])

    boxes = cat("boxes")
    return YOLOv5Assignment(
        batch_index=cat("image"),
        pred_index=torch.cat([cell_index(shapes, i, lvl.anchor, lvl.gy, lvl.gx) for i, lvl in enumerate(levels)]),
        target_index=cat("target_index"),
        boxes=boxes,
        labels=cat("classes"),
        weights=torch.ones(boxes.shape[0], dtype=boxes.dtype, device=boxes.device),
        batch_size=batch_size,
        num_preds=sum(na * ny * nx for na, ny, nx in shapes),
        extras={
            "levels": levels,
            "level": torch.cat([torch.full_like(lvl.image, i) for i, lvl in enumerate(levels)]),
            "anchors": cat("anchors"),
            "offset": cat("offset"),
            "obj_owner": cat("obj_owner"),
        },
    )
