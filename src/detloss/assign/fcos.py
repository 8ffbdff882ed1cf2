"""FCOS target assignment: which ground-truth box, if any, each feature-map point regresses.

A point of pyramid level ``l`` is a *candidate* for a box when

1. it lies strictly inside the box (with centre sampling: strictly inside the square of
   half-side ``radius_l`` around the box centre, clipped to the box), and
2. its largest regression distance ``max(l, t, r, b)`` falls in the level's range;

among several candidates the box of smallest area wins. Two conventions:

``"torchvision"`` -- ``torchvision.models.detection.FCOS.compute_loss`` (torchvision 0.29):
  points at ``(x * sx, y * sy)`` with ``sx = stride`` (or ``image_w // W`` when ``image_size``
  is given, as torchvision's AnchorGenerator does), one square anchor of side ``s`` (the
  anchor size, by default the stride) per point; centre sampling ``max(|px - cx|, |py - cy|)
  < radius * s``; range ``(4 s, 8 s)`` exclusive, lower bound 0 on the first level and upper
  bound inf on the last; winner: largest ``1e8 - area`` (computed in the boxes' dtype), ties to
  the lowest box index, no match when ``1e8 - area < 1e-5``.

``"mmdet"`` -- ``mmdet.models.dense_heads.FCOSHead._get_targets_single`` (mmdetection 3.x):
  points at cell centres ``((x + 0.5) * stride, (y + 0.5) * stride)``; centre sampling box
  ``clip(centre -+ radius * stride, box)``; ranges ``regress_ranges`` inclusive, by default
  ``((-1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8))``; winner: smallest area, ties
  to the lowest box index, no match for areas >= 1e8.

Memory grows with the number of candidate (point, box) pairs, not with points x boxes: for
each box and level only the window of points that can satisfy 1 and 2 is enumerated (with
centre sampling at most a few points per axis), then tested exactly as the originals test
them. A loop runs over pyramid levels only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import as_pair, check_choice, check_floating, check_tensor
from ..anchors import grid_points, per_point, window_cells
from .base import Assignment, rank_in_group

__all__ = ["FCOSAssignment", "PointGrid", "assign_fcos", "make_point_grid", "check_targets"]

CONVENTIONS = ("torchvision", "mmdet")
DEFAULT_STRIDES = (8, 16, 32, 64, 128)
MMDET_INF = 1e8
MMDET_REGRESS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, MMDET_INF))
TV_AREA_OFFSET = 1e8  # torchvision scores candidates by (1e8 - area)
TV_MIN_SCORE = 1e-5  # ... and treats scores below this as "no match"

Targets = Sequence[Union[Dict[str, Tensor], Tensor]]


@dataclass
class PointGrid:
    """The points of all pyramid levels, concatenated level by level, each level row-major.

    Attributes:
        points: ``[P, 2]`` (x, y) pixel coordinates.
        scales: ``[P]`` the length the box coding divides by: torchvision's anchor side, or
            mmdet's stride (used with ``norm_on_bbox``).
        levels: ``[P]`` int64 pyramid level of each point.
        num_points_per_level: ``H * W`` per level.
        feature_sizes: ``(H, W)`` per level.
        spacing: ``(sx, sy)`` distance between neighbouring points per level.
        origin: ``(ox, oy)`` position of point (0, 0) per level.
        radius: centre-sampling half-side per level (None: no centre sampling).
        ranges: ``(lower, upper)`` bounds of ``max(l, t, r, b)`` per level.
    """

    points: Tensor
    scales: Tensor
    levels: Tensor
    num_points_per_level: List[int]
    feature_sizes: List[Tuple[int, int]]
    spacing: List[Tuple[float, float]]
    origin: List[Tuple[float, float]]
    radius: Optional[List[float]]
    ranges: List[Tuple[float, float]]


class FCOSAssignment(Assignment):
    """What :func:`assign_fcos` returns: an :class:`~detloss.assign.base.Assignment` with one
    positive per foreground point (image-major, then point): ``pred_index`` the point,
    ``target_index`` the box's index in its image's ``boxes``, ``boxes`` its xyxy pixels,
    ``labels`` its class (-1 when the targets carry no labels), ``weights`` ones.

    ``extras``: ``matched_idxs`` int64 ``[B, P]`` (torchvision's ``matched_idxs``: the box index
    per point, ``-1`` background; :meth:`matched_idxs` gives its rows), ``levels`` int64 ``[P]``
    (pyramid level per point, also :attr:`levels`) and ``grid`` (the :class:`PointGrid`, also
    :attr:`grid`).
    """

    @property
    def levels(self) -> Tensor:
        return self.extras["levels"]

    @property
    def grid(self) -> PointGrid:
        return self.extras["grid"]

    def foreground(self) -> Tensor:
        return self.extras["matched_idxs"] >= 0

    def matched_idxs(self) -> List[Tensor]:
        return list(self.extras["matched_idxs"].unbind(0))

    def num_pos_per_level(self) -> List[int]:
        """Number of foreground points per level, summed over the batch."""
        return torch.bincount(self.levels[self.pred_index], minlength=len(self.grid.num_points_per_level)).tolist()


def _assignment(
    matched: Tensor, boxes_list: Sequence[Tensor], labels_list: Sequence[Optional[Tensor]], grid: PointGrid
) -> FCOSAssignment:
    """The positives of ``matched [B, P]``, with their boxes and labels gathered."""
    num_points = matched.shape[1]
    pos = (matched.reshape(-1) >= 0).nonzero().squeeze(1)
    img, point = torch.div(pos, num_points, rounding_mode="floor"), pos % num_points
    local = matched.reshape(-1)[pos]
    device = matched.device
    counts = torch.tensor([b.shape[0] for b in boxes_list], dtype=torch.long, device=device)
    row = (torch.cumsum(counts, 0) - counts)[img] + local  # in the concatenated boxes
    dtype = grid.points.dtype
    boxes = torch.cat([b.to(device=device, dtype=dtype) for b in boxes_list]) if boxes_list else grid.points.new_zeros((0, 4))
    labels = torch.cat([
        (lb if lb is not None else torch.full((b.shape[0],), -1)).to(device=device, dtype=torch.int64)
        for b, lb in zip(boxes_list, labels_list)
    ]) if boxes_list else torch.zeros(0, dtype=torch.int64, device=device)
    return FCOSAssignment(
        batch_index=img,
        pred_index=point,
        target_index=local,
        boxes=boxes[row],
        labels=labels[row],
        weights=torch.ones(pos.shape[0], dtype=dtype, device=device),
        batch_size=matched.shape[0],
        num_preds=num_points,
        extras={"matched_idxs": matched, "levels": grid.levels, "grid": grid},
    )


def check_feature_sizes(feature_sizes: Sequence, num_levels: int) -> List[Tuple[int, int]]:
    """``feature_sizes``: one (H, W) pair of positive ints per level."""
    if isinstance(feature_sizes, Tensor):
        feature_sizes = feature_sizes.tolist()
    try:
        sizes = [as_pair("feature_sizes", s) for s in feature_sizes]
    except TypeError:
        raise TypeError(f"feature_sizes: expected a list of (H, W) pairs, got {feature_sizes!r}") from None
    if len(sizes) != num_levels:
        raise ValueError(
            f"feature_sizes: expected {num_levels} (H, W) pairs (one per stride), got {len(sizes)}: {sizes}"
        )
    for lvl, (h, w) in enumerate(sizes):
        if h <= 0 or w <= 0:
            raise ValueError(f"feature_sizes: expected positive (H, W), got {(h, w)} at level {lvl}")
    return sizes


def make_point_grid(
    feature_sizes: Sequence[Tuple[int, int]],
    strides: Sequence[int] = DEFAULT_STRIDES,
    *,
    convention: str = "torchvision",
    center_sampling_radius: Optional[float] = 1.5,
    anchor_sizes: Optional[Sequence[float]] = None,
    regress_ranges: Optional[Sequence[Tuple[float, float]]] = None,
    image_size: Optional[Tuple[int, int]] = None,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device, None] = None,
) -> PointGrid:
    """Build the points of every level with the convention's placement, scales and ranges.

    ``image_size`` (h, w) only matters for ``"torchvision"``: its AnchorGenerator spaces points
    by ``image_h // H`` and ``image_w // W`` (which differs from the stride when the image is not
    a multiple of it); without it the strides are used.
    """
    check_choice("convention", convention, CONVENTIONS)
    strides = [int(s) for s in strides]
    sizes = check_feature_sizes(feature_sizes, len(strides))
    n_lvl = len(strides)
    if center_sampling_radius is not None and not center_sampling_radius > 0:
        raise ValueError(f"center_sampling_radius: expected a positive number or None, got {center_sampling_radius!r}")

    spacing: List[Tuple[float, float]] = []
    origin: List[Tuple[float, float]] = []
    scales: List[float] = []
    ranges: List[Tuple[float, float]] = []
    if convention == "torchvision":
        anchor_sizes = list(strides) if anchor_sizes is None else [float(a) for a in anchor_sizes]
        if len(anchor_sizes) != n_lvl:
            raise ValueError(f"anchor_sizes: expected {n_lvl} values (one per stride), got {len(anchor_sizes)}")
        img = None if image_size is None else as_pair("image_size", image_size)
        for lvl, ((h, w), s, a) in enumerate(zip(sizes, strides, anchor_sizes)):
            sy, sx = (s, s) if img is None else (img[0] // h, img[1] // w)
            spacing.append((float(sx), float(sy)))
            origin.append((0.0, 0.0))
            # AnchorGenerator rounds the base anchor's half sides: side = 2 * round(a / 2).
            side = 2.0 * float(torch.tensor(a / 2.0, dtype=torch.float64).round())
            scales.append(side)
            lower = 0.0 if lvl == 0 else 4.0 * side
            upper = math.inf if lvl == n_lvl - 1 else 8.0 * side
            ranges.append((lower, upper))
        radius = None if center_sampling_radius is None else [center_sampling_radius * a for a in scales]
    else:
        if regress_ranges is None:
            if n_lvl != len(MMDET_REGRESS_RANGES):
                raise ValueError(
                    f"regress_ranges: required for {n_lvl} levels (the default covers {len(MMDET_REGRESS_RANGES)})"
                )
            regress_ranges = MMDET_REGRESS_RANGES
        if len(regress_ranges) != n_lvl:
            raise ValueError(f"regress_ranges: expected {n_lvl} (lower, upper) pairs, got {len(regress_ranges)}")
        for s in strides:
            spacing.append((float(s), float(s)))
            origin.append((0.5 * s, 0.5 * s))  # the cell centre
            scales.append(float(s))
        ranges = [(float(lo), float(hi)) for lo, hi in regress_ranges]
        radius = None if center_sampling_radius is None else [center_sampling_radius * s for s in strides]

    offset = 0.0 if convention == "torchvision" else 0.5  # corners / cell centres
    points = grid_points(sizes, spacing, offset=offset, dtype=dtype, device=device)
    return PointGrid(
        points=points,
        scales=per_point(scales, sizes, dtype=dtype, device=device),
        levels=per_point(range(n_lvl), sizes, dtype=torch.int64, device=device),
        num_points_per_level=[h * w for h, w in sizes],
        feature_sizes=sizes,
        spacing=spacing,
        origin=origin,
        radius=radius,
        ranges=ranges,
    )


def check_targets(
    targets: Targets, batch_size: Optional[int] = None, num_classes: Optional[int] = None
) -> List[Tuple[Tensor, Optional[Tensor]]]:
    """Validate torchvision-style targets; returns ``[(boxes [n, 4], labels [n] or None)]``.

    Each entry is a dict with ``"boxes"`` (xyxy pixels, floating, finite, ``x1 <= x2`` and
    ``y1 <= y2``) and, when ``num_classes`` is given, ``"labels"`` (integers in
    ``[0, num_classes)``); a bare ``[n, 4]`` tensor of boxes is accepted when labels are not needed.
    """
    if isinstance(targets, Tensor) or not isinstance(targets, (list, tuple)):
        raise TypeError(
            f"targets: expected a list of {{'boxes', 'labels'}} dicts (one per image), got {type(targets).__name__}"
        )
    if batch_size is not None and len(targets) != batch_size:
        raise ValueError(f"targets: expected {batch_size} entries (one per image), got {len(targets)}")
    out: List[Tuple[Tensor, Optional[Tensor]]] = []
    for i, t in enumerate(targets):
        name = f"targets[{i}]"
        if isinstance(t, dict):
            if "boxes" not in t:
                raise ValueError(f"{name}: expected a dict with 'boxes' and 'labels', got keys {sorted(t)}")
            boxes = check_floating(f"{name}['boxes']", t["boxes"])
            labels = t.get("labels")
        elif isinstance(t, Tensor) and num_classes is None:
            boxes, labels = check_floating(name, t), None
        else:
            raise TypeError(f"{name}: expected a dict with 'boxes' and 'labels', got {type(t).__name__}")
        if boxes.numel() == 0:
            boxes = boxes.reshape(0, 4)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"{name}['boxes']: expected shape [n, 4], got {tuple(boxes.shape)}")
        bad = ~torch.isfinite(boxes).all(dim=1)
        if bad.any():
            r = int(bad.nonzero()[0])
            raise ValueError(f"{name}['boxes']: expected finite values, row {r} is {boxes[r].tolist()}")
        bad = (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
        if bad.any():
            r = int(bad.nonzero()[0])
            raise ValueError(
                f"{name}['boxes']: expected xyxy boxes with x1 <= x2 and y1 <= y2, row {r} is {boxes[r].tolist()}"
            )
        if num_classes is not None:
            if labels is None:
                raise ValueError(f"{name}: expected a 'labels' entry")
            check_tensor(f"{name}['labels']", labels)
            if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
                raise TypeError(f"{name}['labels']: expected an integer tensor, got dtype {labels.dtype}")
            if labels.numel() == 0:
                labels = labels.reshape(0)
            if labels.shape != (boxes.shape[0],):
                raise ValueError(
                    f"{name}['labels']: expected shape [{boxes.shape[0]}] (one per box), got {tuple(labels.shape)}"
                )
            bad = (labels < 0) | (labels >= num_classes)
            if bad.any():
                r = int(bad.nonzero()[0])
                raise ValueError(
                    f"{name}['labels']: expected class indices in [0, {num_classes}), row {r} is {int(labels[r])}"
                )
            labels = labels.long()
        out.append((boxes, labels))
    return out


def _candidate_pairs(boxes: Tensor, grid: PointGrid, convention: str) -> Tuple[Tensor, Tensor]:
    """Enumerate (box, point) pairs that pass the convention's tests; ``boxes`` is ``[T, 4]``.

    For each box and level only a window of points is visited (:func:`detloss.anchors.window_cells`):
    the points inside the box, the centre-sampling square and the band where ``max(l, t, r, b)``
    stays under the level's upper bound, widened by one point each side so rounding can never
    drop a true candidate. Returns ``(box_index [K], point_index [K])``, by box, then level.
    """
    dev = boxes.device
    n_lvl = len(grid.feature_sizes)
    b64 = boxes.to(torch.float64)
    x1, y1, x2, y2 = b64.unbind(-1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    starts, counts = [], []
    for lvl, (h, w) in enumerate(grid.feature_sizes):
        (sx, sy), (ox, oy) = grid.spacing[lvl], grid.origin[lvl]
        upper = grid.ranges[lvl][1]
        lo_x, hi_x, lo_y, hi_y = x1, x2, y1, y2
        if grid.radius is not None:
            r = grid.radius[lvl]
            lo_x, hi_x = torch.maximum(lo_x, cx - r), torch.minimum(hi_x, cx + r)
            lo_y, hi_y = torch.maximum(lo_y, cy - r), torch.minimum(hi_y, cy + r)
        if math.isfinite(upper):
            lo_x, hi_x = torch.maximum(lo_x, x2 - upper), torch.minimum(hi_x, x1 + upper)
            lo_y, hi_y = torch.maximum(lo_y, y2 - upper), torch.minimum(hi_y, y1 + upper)
        ix0 = torch.floor((lo_x - ox) / sx).clamp(0, w).long()
        ix1 = torch.ceil((hi_x - ox) / sx).clamp(-1, w - 1).long()
        iy0 = torch.floor((lo_y - oy) / sy).clamp(0, h).long()
        iy1 = torch.ceil((hi_y - oy) / sy).clamp(-1, h - 1).long()
        starts.append(torch.stack((ix0, iy0), -1))
        counts.append(torch.stack((ix1 - ix0 + 1, iy1 - iy0 + 1), -1))
    # windows box-major: window k is box k // n_lvl on level k % n_lvl
    rect, ix, iy = window_cells(torch.stack(starts, 1).view(-1, 2), torch.stack(counts, 1).view(-1, 2))
    lvl_of = rect % n_lvl
    box = torch.div(rect, n_lvl, rounding_mode="floor")
    width = torch.tensor([w for _, w in grid.feature_sizes], device=dev)
    first = torch.tensor([0] + grid.num_points_per_level, device=dev).cumsum(0)[:-1]
    point = first[lvl_of] + iy * width[lvl_of] + ix

    # The exact tests, written as the originals write them, on the candidate pairs only.
    g = boxes[box]
    gx1, gy1, gx2, gy2 = g.unbind(-1)
    px, py = grid.points[point].unbind(-1)
    lvl = grid.levels[point]
    lower = torch.tensor([r[0] for r in grid.ranges], dtype=boxes.dtype, device=dev)[lvl]
    upper = torch.tensor([r[1] for r in grid.ranges], dtype=boxes.dtype, device=dev)[lvl]
    dist = torch.stack((px - gx1, py - gy1, gx2 - px, gy2 - py), dim=-1)
    max_dist = dist.max(dim=-1).values
    if convention == "torchvision":
        ok = dist.min(dim=-1).values > 0
        if grid.radius is not None:
            gcx, gcy = (gx1 + gx2) / 2, (gy1 + gy2) / 2
            radius = torch.tensor(grid.radius, dtype=boxes.dtype, device=dev)[lvl]
            ok &= torch.maximum((px - gcx).abs(), (py - gcy).abs()) < radius
        ok &= (max_dist > lower) & (max_dist < upper)
    else:
        if grid.radius is not None:
            gcx, gcy = (gx1 + gx2) / 2, (gy1 + gy2) / 2
            radius = torch.tensor(grid.radius, dtype=boxes.dtype, device=dev)[lvl]
            xmin = torch.where(gcx - radius > gx1, gcx - radius, gx1)
            ymin = torch.where(gcy - radius > gy1, gcy - radius, gy1)
            xmax = torch.where(gcx + radius > gx2, gx2, gcx + radius)
            ymax = torch.where(gcy + radius > gy2, gy2, gcy + radius)
            inner = torch.stack((px - xmin, py - ymin, xmax - px, ymax - py), dim=-1)
            ok = inner.min(dim=-1).values > 0
        else:
            ok = dist.min(dim=-1).values > 0
        ok &= (max_dist >= lower) & (max_dist <= upper)
    return box[ok], point[ok]


def assign_fcos(
    targets: Targets,
    feature_sizes: Sequence[Tuple[int, int]],
    strides: Sequence[int] = DEFAULT_STRIDES,
    *,
    convention: str = "torchvision",
    center_sampling_radius: Optional[float] = 1.5,
    anchor_sizes: Optional[Sequence[float]] = None,
    regress_ranges: Optional[Sequence[Tuple[float, float]]] = None,
    image_size: Optional[Tuple[int, int]] = None,
    dtype: Optional[torch.dtype] = None,
    grid: Optional[PointGrid] = None,
) -> FCOSAssignment:
    """Assign every point of every image to one ground-truth box or to the background.

    Args:
        targets: one entry per image: ``{"boxes": [n, 4] xyxy pixels, ...}`` or a bare ``[n, 4]``
            tensor of boxes.
        feature_sizes: ``(H, W)`` per level; levels are concatenated in order, each row-major.
        strides: stride per level.
        convention: ``"torchvision"`` or ``"mmdet"`` (see the module docstring).
        center_sampling_radius: half-side of the sampling square in strides (anchor sides for
            torchvision); ``None`` turns centre sampling off.
        anchor_sizes: torchvision's anchor size per level (default: the strides).
        regress_ranges: mmdet's ``(lower, upper)`` per level (default: mmdet's).
        image_size: ``(h, w)`` of the padded batch; torchvision places points with
            ``image_size // feature_size`` spacing (its AnchorGenerator) when given.
        dtype: floating dtype the tests are computed in (default: the boxes' dtype, at least float32).
        grid: a precomputed :func:`make_point_grid` (then the grid arguments above are ignored).

    Returns:
        :class:`FCOSAssignment`: the foreground points as positives, with ``matched_idxs [B, P]``
        (box index per point, ``-1`` background), ``levels [P]`` (level per point) and the grid
        in its extras.
    """
    check_choice("convention", convention, CONVENTIONS)
    pairs = check_targets(targets)
    boxes_list = [b for b, _ in pairs]
    if dtype is None:
        dtype = torch.float32
        for b in boxes_list:
            dtype = torch.promote_types(dtype, b.dtype)
    device = boxes_list[0].device if boxes_list else None
    if grid is None:
        grid = make_point_grid(
            feature_sizes,
            strides,
            convention=convention,
            center_sampling_radius=center_sampling_radius,
            anchor_sizes=anchor_sizes,
            regress_ranges=regress_ranges,
            image_size=image_size,
            dtype=dtype,
            device=device,
        )
    matched = match_boxes(boxes_list, grid, convention, dtype)
    return _assignment(matched, boxes_list, [lb for _, lb in pairs], grid)


def match_boxes(boxes_list: Sequence[Tensor], grid: PointGrid, convention: str, dtype: torch.dtype) -> Tensor:
    """``[B, P]`` matched box index per point (``-1`` background) for validated boxes."""
    num_images, num_points = len(boxes_list), grid.points.shape[0]
    device = grid.points.device
    matched = torch.full((num_images * num_points,), -1, dtype=torch.int64, device=device)
    counts = [b.shape[0] for b in boxes_list]
    if sum(counts) == 0:
        return matched.view(num_images, num_points)
    boxes = torch.cat([b.to(dtype=dtype, device=device) for b in boxes_list])
    counts_t = torch.tensor(counts, device=device)
    image = torch.repeat_interleave(torch.arange(num_images, device=device), counts_t)
    local = torch.arange(len(boxes), device=device) - (torch.cumsum(counts_t, 0) - counts_t)[image]

    box, point = _candidate_pairs(boxes, grid, convention)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    if convention == "torchvision":
        score = (TV_AREA_OFFSET - area)[box]
        keep = score >= TV_MIN_SCORE
    else:
        score = -area[box]
        keep = area[box] < MMDET_INF
    box, point, score = box[keep], point[keep], score[keep]
    flat = image[box] * num_points + point
    # the best score of each point wins, the lowest box index on ties (candidates are in box order)
    win = rank_in_group(flat, score) == 0
    matched[flat[win]] = local[box[win]]
    return matched.view(num_images, num_points)
