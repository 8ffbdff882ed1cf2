r"""IoU matching of anchors to ground-truth boxes: torchvision's ``Matcher`` and ``SSDMatcher``.

Source: torchvision 0.29 ``models/detection/_utils.py`` (``Matcher`` with
``allow_low_quality_matches``, ``SSDMatcher``), as ``RetinaNet.compute_loss`` and ``SSD.forward``
call them on ``box_iou(gt_boxes, anchors)`` image by image. For an image with ground truth,
with ``q[g, a]`` the IoU of box ``g`` and anchor ``a``:

- every anchor takes its best box ``m(a) = argmax_g q[g, a]`` (the first, lowest index on exact
  ties; 0 for an anchor that overlaps no box) with ``v(a) = max_g q[g, a]``;
- :func:`assign_iou` (RetinaNet, Faster R-CNN's RPN): ``v < bg_iou_thresh`` is background (-1),
  ``bg_iou_thresh <= v < fg_iou_thresh`` is ignored (-2, "between thresholds"),
  ``v >= fg_iou_thresh`` is a positive of ``m(a)``. With ``allow_low_quality_matches``, for every
  box ``g`` each anchor reaching ``max_a q[g, a]`` (all exact ties) is set back to ``m(a)`` -- the
  anchor's own best box, not necessarily ``g``. A box that overlaps no anchor has that maximum 0,
  so *every* anchor of its image is then set to its ``m(a)`` (torchvision's behaviour, kept);
- :func:`assign_ssd` (SSD): ``v < iou_thresh`` is background, ``v >= iou_thresh`` a positive of
  ``m(a)``; then each box's best anchor (first index on ties; anchor 0 if it overlaps none) is
  forced to that box, the higher box index winning an anchor two boxes share (the last write of
  torchvision's CPU ``index_put``).

An image without boxes is all background. The result is an :class:`~detloss.assign.base.Assignment`
whose positives are listed image by image in ascending anchor order (torchvision's order) and
whose :meth:`~detloss.assign.base.Assignment.matched_idxs` is torchvision's ``matched_idxs``.

Cost. The matcher never builds the boxes x anchors matrix. Only pairs with an IoU of at least
the lower threshold can make an anchor positive or ignored, and an IoU of ``t`` needs an area
ratio within ``[t, 1 / t]`` and a wide enough overlap; an index of the anchors (size classes,
rows of centres, sorted columns, :class:`AnchorIndex`) turns that into a few index ranges per box.
A box whose best IoU lies below the threshold (a small or thin box) is searched again at half the
IoU until its best anchors are found; the few anchors the low-quality rule gives to their own
best box, when that box's IoU is below the threshold too, are looked up in an index of the boxes.
Time and memory therefore grow with the number of such pairs plus the anchors, not with anchors x
boxes. The IoU of each pair is computed with torchvision's ``box_iou`` operations in the same
order, so ties and threshold comparisons come out the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import check_floating, check_tensor
from .base import BACKGROUND, IGNORED, Assignment
from .fcos import check_targets

__all__ = [
    "assign_iou",
    "assign_ssd",
    "check_anchors",
    "overlapping_pairs",
    "AnchorsLike",
    "AnchorIndex",
    "AnchorIndexCache",
]

AnchorsLike = Union[Tensor, Sequence[Tensor]]

#: Size classes of the anchor index per octave of width and of height (finer: fewer candidates
#: per class, more classes). Anchors come in few sizes (45 for RetinaNet), so fine classes cost
#: nothing; ground-truth boxes come in any size, and are indexed with coarse classes.
_CLASSES_PER_OCTAVE = 8
_BOX_CLASSES_PER_OCTAVE = 0.5
#: Largest lookup table of an :class:`AnchorIndex` (entries; 8 bytes each).
_MAX_TABLE = 1 << 22


# ----------------------------------------------------------------------------- inputs
def check_anchors(anchors: object, batch_size: int, num_anchors: Optional[int] = None) -> Tensor:
    """Anchors as ``[G, A, 4]`` with ``G = 1`` (one set for every image) or ``G = batch_size``.

    Accepts one ``[A, 4]`` (or ``[1, A, 4]``) tensor for the batch, a ``[B, A, 4]`` tensor or a list of ``B``
    ``[A, 4]`` tensors (torchvision's form; equal entries are recognised and shared). Anchors must
    be finite xyxy boxes of positive width and height; ``num_anchors`` (the ``A`` of the head
    outputs) is checked when given.
    """
    if isinstance(anchors, Tensor):
        check_floating("anchors", anchors)
        if anchors.ndim == 2:
            stacked, names = anchors[None], ["anchors"]
        elif anchors.ndim == 3 and anchors.shape[0] in (1, batch_size):
            stacked, names = anchors, [f"anchors[{i}]" for i in range(anchors.shape[0])]
        else:
            raise ValueError(
                f"anchors: expected [A, 4] (shared) or [{batch_size}, A, 4] xyxy pixels, got {tuple(anchors.shape)}"
            )
    elif isinstance(anchors, (list, tuple)):
        if len(anchors) != batch_size or batch_size == 0:
            raise ValueError(f"anchors: expected {batch_size} tensors (one per image), got {len(anchors)}")
        names = [f"anchors[{i}]" for i in range(batch_size)]
        for name, a in zip(names, anchors):
            check_floating(name, a)
            if a.ndim != 2 or a.shape[1] != 4:
                raise ValueError(f"{name}: expected shape [A, 4] (xyxy pixels), got {tuple(a.shape)}")
            if a.shape[0] != anchors[0].shape[0]:
                raise ValueError(
                    f"{name}: expected {anchors[0].shape[0]} anchors like anchors[0], got {a.shape[0]}"
                )
            if a.device != anchors[0].device or a.dtype != anchors[0].dtype:
                raise ValueError(f"{name}: expected {anchors[0].dtype} on {anchors[0].device} like anchors[0]")
        # torchvision hands every image an equal copy: one set is kept when they are all equal
        same = all(a is anchors[0] for a in anchors[1:])
        stacked = anchors[0][None] if same else torch.stack(list(anchors))
    else:
        raise TypeError(f"anchors: expected a tensor [A, 4] or a list of [A, 4] tensors, got {type(anchors).__name__}")
    if stacked.shape[-1] != 4:
        raise ValueError(f"anchors: expected boxes of 4 coordinates, got {tuple(stacked.shape)}")
    if stacked.shape[0] > 1 and all(torch.equal(a, stacked[0]) for a in stacked[1:]):
        stacked = stacked[:1]
    if num_anchors is not None and stacked.shape[1] != num_anchors:
        raise ValueError(
            f"{names[0]}: expected {num_anchors} anchors per image (the A of the head outputs), got {stacked.shape[1]}"
        )
    d = stacked.detach()
    bad = ~torch.isfinite(d).all(-1) | (d[..., 2] <= d[..., 0]) | (d[..., 3] <= d[..., 1])
    if bool(bad.any()):
        g, r = (int(v) for v in bad.nonzero()[0])
        raise ValueError(
            f"{names[g]}: expected finite xyxy boxes with x2 > x1 and y2 > y1, row {r} is {d[g, r].tolist()}"
        )
    return stacked


# ----------------------------------------------------------------------------- sparse IoU
@dataclass
class AnchorIndex:
    """Boxes of positive size (anchors) grouped into size classes per group, within a class into
    rows of centre y, within a row sorted by centre x, so that the candidates of a query box are a
    few index ranges. Build it with :meth:`build`; its arithmetic is float64.

    Rows are the distinct centre ys (anchors on a lattice) or, with ``row_bins``, bands of centre
    y as high as the class's tallest box (boxes of any position: ground truth)."""

    cls_group: Tensor  # [S] group of each class (ascending)
    w_max: Tensor  # [S] width, height and area bounds of each class
    h_max: Tensor
    area_min: Tensor
    area_max: Tensor
    row_bin: Optional[Tensor]  # [S] band height of each class's rows, or None: exact centre ys
    uy: Tensor  # [Ny] distinct row coordinates (centre y or band number), ascending
    ux: Tensor  # [Nx] distinct centre x
    row_keys: Tensor  # [R] class * Ny + row rank, ascending
    anchor_keys: Tensor  # [N] row * Nx + x rank, ascending
    order: Tensor  # [N] anchor of each sorted key
    # Lookup tables of the two large searches (None where they would be too large): entry
    # [c * (Ny + 1) + y] is the first row of class c at row rank >= y, entry [r * (Nx + 1) + x]
    # the first sorted anchor of row r at x rank >= x (searchsorted of every possible query).
    row_table: Optional[Tensor] = None
    anchor_table: Optional[Tensor] = None

    def first_row(self, klass: Tensor, y: Tensor) -> Tensor:
        """Position in ``row_keys`` of the first row of class ``klass`` at row rank >= ``y``
        (``0 <= y <= Ny``)."""
        if self.row_table is not None:
            return self.row_table.index_select(0, klass * (self.uy.shape[0] + 1) + y)
        return torch.searchsorted(self.row_keys, klass * self.uy.shape[0] + y, side="left")

    def first_anchor(self, row: Tensor, x: Tensor) -> Tensor:
        """Position in ``anchor_keys`` of the first anchor of row ``row`` at x rank >= ``x``
        (``0 <= x <= Nx``)."""
        if self.anchor_table is not None:
            return self.anchor_table.index_select(0, row * (self.ux.shape[0] + 1) + x)
        return torch.searchsorted(self.anchor_keys, row * self.ux.shape[0] + x, side="left")

    @classmethod
    def build(
        cls,
        anchors: Tensor,
        group: Optional[Tensor] = None,
        *,
        classes_per_octave: float = _CLASSES_PER_OCTAVE,
        row_bins: bool = False,
        tables: bool = True,
    ) -> "AnchorIndex":
        """Index of ``anchors`` ``[N, 4]`` (xyxy, positive sizes) in groups ``group`` ``[N]``
        (default: one group); ``classes_per_octave`` size classes per octave of width and of
        height (more: tighter windows, more classes to visit); ``tables``: also build the lookup
        tables of the row and anchor searches (for an index kept between calls)."""
        flat = anchors.detach().to(torch.float64)
        dev = flat.device
        if group is None:
            group = torch.zeros(flat.shape[0], dtype=torch.int64, device=dev)
        w, h = flat[:, 2] - flat[:, 0], flat[:, 3] - flat[:, 1]
        cx, cy = (flat[:, 0] + flat[:, 2]) * 0.5, (flat[:, 1] + flat[:, 3]) * 0.5
        qw = torch.floor(torch.log2(w) * classes_per_octave).long()
        qh = torch.floor(torch.log2(h) * classes_per_octave).long()
        qw, qh = qw - qw.min(), qh - qh.min()
        nw, nh = int(qw.max()) + 1, int(qh.max()) + 1
        keys, klass = torch.unique((group * nw + qw) * nh + qh, return_inverse=True)
        s = keys.shape[0]

        def bound(v: Tensor, how: str) -> Tensor:
            init = math.inf if how == "amin" else 0.0
            return torch.full((s,), init, dtype=torch.float64, device=dev).scatter_reduce(0, klass, v, how)

        h_max = bound(h, "amax")
        row_bin = h_max if row_bins else None
        if row_bin is not None:
            cy = torch.floor(cy / row_bin.index_select(0, klass))
        uy, ry = torch.unique(cy, return_inverse=True)
        ux, rx = torch.unique(cx, return_inverse=True)
        row_keys, row = torch.unique(klass * uy.shape[0] + ry, return_inverse=True)
        anchor_keys, order = torch.sort(row * ux.shape[0] + rx, stable=True)
        ny, nx, r = uy.shape[0], ux.shape[0], row_keys.shape[0]
        row_table = anchor_table = None
        if tables and s * (ny + 1) <= _MAX_TABLE and r * (nx + 1) <= _MAX_TABLE:
            q = torch.arange(ny + 1, device=dev)
            row_table = torch.searchsorted(row_keys, (torch.arange(s, device=dev)[:, None] * ny + q).reshape(-1))
            q = torch.arange(nx + 1, device=dev)
            anchor_table = torch.searchsorted(anchor_keys, (torch.arange(r, device=dev)[:, None] * nx + q).reshape(-1))
        return cls(
            keys // (nw * nh), bound(w, "amax"), h_max, bound(w * h, "amin"), bound(w * h, "amax"), row_bin,
            uy, ux, row_keys, anchor_keys, order, row_table, anchor_table,
        )


class AnchorIndexCache:
    """The :class:`AnchorIndex` of the last anchors seen, reused while the anchors stay equal.

    A detector's anchors are the same at every step (torchvision even rebuilds equal tensors each
    call), so a loss keeps one of these and the index is built once: :meth:`get` compares the
    anchors with the cached copy (one pass) and rebuilds only when they differ."""

    def __init__(self) -> None:
        self._anchors: Optional[Tensor] = None
        self._index: Optional[AnchorIndex] = None

    def get(self, anchors: Tensor) -> AnchorIndex:
        """The index of ``[G, A, 4]`` anchors (group = first dimension)."""
        a = anchors.detach()
        cached = self._anchors
        if (
            cached is None
            or self._index is None
            or cached.shape != a.shape
            or cached.dtype != a.dtype
            or cached.device != a.device
            or not torch.equal(cached, a)
        ):
            group = torch.arange(a.shape[0], device=a.device).repeat_interleave(a.shape[1])
            self._index = AnchorIndex.build(a.reshape(-1, 4), group)
            self._anchors = a.clone()
        return self._index


def _expand(counts: Tensor) -> Tuple[Tensor, Tensor]:
    """For ranges of ``counts`` items: (range of each item, position of the item in its range)."""
    total = int(counts.sum()) if counts.numel() else 0
    owner = torch.repeat_interleave(torch.arange(counts.shape[0], device=counts.device), counts, output_size=total)
    start = torch.cumsum(counts, 0) - counts
    return owner, torch.arange(total, device=counts.device) - start.index_select(0, owner)


def _box_iou_pairs(boxes: Tensor, anchors: Tensor) -> Tensor:
    """IoU of aligned pairs with ``torchvision.ops.box_iou``'s operations in its order."""
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    wh = (torch.minimum(boxes[:, 2:], anchors[:, 2:]) - torch.maximum(boxes[:, :2], anchors[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    return inter / (area_b + area_a - inter)


def _iou_dtype(boxes: Tensor, anchors: Tensor) -> torch.dtype:
    return torch.promote_types(torch.promote_types(boxes.dtype, anchors.dtype), torch.float32)


def overlapping_pairs(
    boxes: Tensor,
    anchors: Tensor,
    *,
    box_group: Optional[Tensor] = None,
    anchor_group: Optional[Tensor] = None,
    min_iou: Union[float, Tensor] = 0.0,
    index: Optional[AnchorIndex] = None,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Every (box, anchor) pair of the same group with a positive IoU of at least ``min_iou``.

    Args:
        boxes: ``[T, 4]`` xyxy boxes (finite, ``x2 >= x1``, ``y2 >= y1``).
        anchors: ``[N, 4]`` xyxy boxes of positive width and height.
        box_group, anchor_group: int64 ``[T]`` / ``[N]``: a box meets only anchors of its group
            (images of a batch); default one group.
        min_iou: lower bound of the IoU of the pairs wanted, one for all boxes or one per box
            ``[T]``; above 0 it prunes the search (an IoU of ``t`` needs an area ratio within
            ``[t, 1 / t]`` and a wide enough overlap).
        index: a prebuilt :class:`AnchorIndex` of ``anchors`` (and ``anchor_group``).

    Returns:
        ``(box_index [K], anchor_index [K], iou [K])`` in no particular order; the IoU in the
        promoted dtype of boxes and anchors (at least float32) is ``box_iou(boxes, anchors)`` at
        those entries, computed with its operations; every entry not listed is 0, below
        ``min_iou`` or between boxes of different groups.
    """
    dev = anchors.device
    dtype = _iou_dtype(boxes, anchors)
    empty = torch.zeros(0, dtype=torch.int64, device=dev)
    if boxes.shape[0] == 0 or anchors.shape[0] == 0:
        return empty, empty.clone(), torch.zeros(0, dtype=dtype, device=dev)
    ix = AnchorIndex.build(anchors, anchor_group, tables=False) if index is None else index
    if box_group is None:
        box_group = torch.zeros(boxes.shape[0], dtype=torch.int64, device=dev)
    b64 = boxes.detach().to(torch.float64)
    # Box x class pairs (the classes of the box's group) ...
    c0 = torch.searchsorted(ix.cls_group, box_group, side="left")
    c1 = torch.searchsorted(ix.cls_group, box_group, side="right")
    pb, k = _expand(c1 - c0)
    pc = c0.index_select(0, pb) + k
    bx = b64.index_select(0, pb)
    gw, gh = bx[:, 2] - bx[:, 0], bx[:, 3] - bx[:, 1]
    gcx, gcy = (bx[:, 0] + bx[:, 2]) * 0.5, (bx[:, 1] + bx[:, 3]) * 0.5
    w_max, h_max = ix.w_max.index_select(0, pc), ix.h_max.index_select(0, pc)
    # ... and the window of anchor centres that can reach the IoU: |dx| <= (w_b + w_a) / 2 minus
    # the overlap width an IoU of t needs, t max(area_b, area_a) / min(h_b, h_a); likewise in y.
    # t is loosened by 1e-4 relative so that the rounding of an IoU never drops a pair.
    half_x, half_y = (gw + w_max) * 0.5, (gh + h_max) * 0.5
    per_box = isinstance(min_iou, Tensor)
    if per_box or min_iou > 0:
        t = (min_iou.to(torch.float64).index_select(0, pb) if per_box else float(min_iou)) * (1 - 1e-4)
        area = gw * gh
        a_min, a_max = ix.area_min.index_select(0, pc), ix.area_max.index_select(0, pc)
        need = t * torch.maximum(area, a_min)
        half_x = half_x - need / torch.minimum(gh, h_max).clamp(min=1e-300)
        half_y = half_y - need / torch.minimum(gw, w_max).clamp(min=1e-300)
        ok = (area > 0) & (a_max >= t * area) & (a_min * t <= area) & (half_x >= 0) & (half_y >= 0)
        keep = ok.nonzero().squeeze(1)
        pb, pc, gcx, gcy = pb[keep], pc[keep], gcx[keep], gcy[keep]
        half_x, half_y = half_x[keep], half_y[keep]
    tol_x = 1e-9 * (gcx.abs() + half_x + 1)
    tol_y = 1e-9 * (gcy.abs() + half_y + 1)
    lo_y, hi_y = gcy - half_y - tol_y, gcy + half_y + tol_y
    if ix.row_bin is not None:
        band = ix.row_bin.index_select(0, pc)
        lo_y, hi_y = torch.floor(lo_y / band), torch.floor(hi_y / band)
    y0 = torch.searchsorted(ix.uy, lo_y, side="left")
    y1 = torch.searchsorted(ix.uy, hi_y, side="right")
    x0 = torch.searchsorted(ix.ux, gcx - half_x - tol_x, side="left")
    x1 = torch.searchsorted(ix.ux, gcx + half_x + tol_x, side="right")
    # ... x the rows of that class within the y window ...
    r0 = ix.first_row(pc, y0)
    r1 = ix.first_row(pc, y1)
    pr, k = _expand(r1 - r0)
    row = r0.index_select(0, pr) + k
    # ... x the anchors of that row within the x window.
    a0 = ix.first_anchor(row, x0.index_select(0, pr))
    a1 = ix.first_anchor(row, x1.index_select(0, pr))
    pa, k = _expand(a1 - a0)
    anchor_index = ix.order.index_select(0, a0.index_select(0, pa) + k)
    box_index = pb.index_select(0, pr.index_select(0, pa))
    # The exact IoU, in torchvision's operations and dtype, on the candidates only.
    iou = _box_iou_pairs(
        boxes.detach().to(dtype).index_select(0, box_index), anchors.detach().to(dtype).index_select(0, anchor_index)
    )
    lower = min_iou.to(dtype).index_select(0, box_index) if per_box else min_iou
    keep = ((iou > 0) & (iou >= lower)).nonzero().squeeze(1)
    return box_index[keep], anchor_index[keep], iou[keep]


def _first_best(size: int, slot: Tensor, iou: Tensor, box: Tensor) -> Tuple[Tensor, Tensor]:
    """Per slot of ``[size]``: the largest ``iou`` of its pairs (0 without) and the lowest ``box``
    reaching it (0 without): ``torch.max(dim=0)`` of an IoU matrix, from its nonzero entries."""
    best = torch.zeros(size, dtype=iou.dtype, device=iou.device).scatter_reduce(0, slot, iou, "amax")
    at = (iou == best.index_select(0, slot)).nonzero().squeeze(1)
    first = torch.full((size,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=iou.device)
    first = first.scatter_reduce(0, slot[at], box[at], "amin")
    return best, torch.where(best > 0, first, torch.zeros_like(first))


# ----------------------------------------------------------------------------- matching
#: Below this IoU, the search for a box's best anchors stops pruning and visits every overlap.
_MIN_PRUNED_IOU = 1e-4


@dataclass
class _Overlaps:
    """What both matchers read from the overlapping pairs of a batch (built by :func:`_overlaps`).

    Anchors are addressed by ``slot = image * A + anchor``; boxes by their row in the batch's
    flat list (image by image)."""

    batch_size: int
    num_anchors: int
    anchors: Tensor  # [G, A, 4]
    boxes: Tensor  # [T, 4]
    labels: Tensor  # [T]
    counts: Tensor  # [B] boxes per image
    image: Tensor  # [T] image of each box
    local: Tensor  # [T] index of each box within its image
    first_box: Tensor  # [B] row of each image's first box
    index: Optional[AnchorIndex] = None
    anchor_best: Optional[Tensor] = None  # [B * A] v(a) where v(a) >= min_iou, else 0
    anchor_match: Optional[Tensor] = None  # [B * A] m(a) (local box index) where v(a) >= min_iou, else 0
    box_best: Optional[Tensor] = None  # [T] each box's best IoU over the anchors (exact)
    best_box: Optional[Tensor] = None  # [L] the pairs at their box's best IoU (all ties): box ...
    best_slot: Optional[Tensor] = None  # [L] ... and anchor slot

    @property
    def has_boxes(self) -> Tensor:
        return self.counts > 0

    def _group(self, image: Tensor) -> Tensor:
        return image if self.anchors.shape[0] > 1 else torch.zeros_like(image)

    def pairs(self, box: Tensor, min_iou: float) -> Tuple[Tensor, Tensor, Tensor]:
        """Overlapping pairs of the boxes ``box`` (rows) with IoU >= ``min_iou``: (box, slot, iou)."""
        a = self.num_anchors
        if self.index is None:
            self.index = AnchorIndexCache().get(self.anchors)
        image = self.image.index_select(0, box)
        pb, pa, iou = overlapping_pairs(
            self.boxes.index_select(0, box), self.anchors.reshape(-1, 4), box_group=self._group(image),
            min_iou=min_iou, index=self.index,
        )
        return box.index_select(0, pb), image.index_select(0, pb) * a + pa % a, iou

    def own_match(self, slot: Tensor, lower: Tensor) -> Tensor:
        """m(a) over every box of its image for the anchors ``slot`` whose best IoU is known to
        be at least ``lower`` (an IoU they reach), found with an index of the boxes: the few
        anchors the low-quality rule gives to their best box while their best IoU lies below
        the searched one."""
        a = self.num_anchors
        real = ((self.boxes[:, 2] > self.boxes[:, 0]) & (self.boxes[:, 3] > self.boxes[:, 1])).nonzero().squeeze(1)
        if real.numel() == 0:
            return torch.zeros_like(slot)
        image = slot // a
        anchors = self.anchors.reshape(-1, 4).index_select(0, self._group(image) * a + slot % a)
        boxes, box_image = self.boxes.index_select(0, real), self.image.index_select(0, real)
        index = AnchorIndex.build(
            boxes, box_image, classes_per_octave=_BOX_CLASSES_PER_OCTAVE, row_bins=True, tables=False
        )
        pa, pb, iou = overlapping_pairs(anchors, boxes, box_group=image, min_iou=lower, index=index)
        return _first_best(slot.shape[0], pa, iou, self.local.index_select(0, real.index_select(0, pb)))[1]

    def image_match(self, images: Tensor) -> Tensor:
        """``[len(images) * A]``: m(a) of every anchor of the images ``images`` (all their overlaps)."""
        a = self.num_anchors
        where = torch.full((self.batch_size,), -1, dtype=torch.int64, device=images.device)
        where[images] = torch.arange(images.shape[0], device=images.device)
        box = (where.index_select(0, self.image) >= 0).nonzero().squeeze(1)
        pb, slot, iou = self.pairs(box, 0.0)
        packed = where.index_select(0, slot // a) * a + slot % a
        return _first_best(images.shape[0] * a, packed, iou, self.local.index_select(0, pb))[1]


def _labels_or_zeros(i: int, boxes: Tensor, labels: Optional[Tensor]) -> Tensor:
    """An image's labels as int64 ``[n]`` (zeros where a target has none)."""
    if labels is None:
        return torch.zeros(boxes.shape[0], dtype=torch.int64)
    check_tensor(f"targets[{i}]['labels']", labels)
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"targets[{i}]['labels']: expected an integer tensor, got dtype {labels.dtype}")
    if labels.reshape(-1).shape[0] != boxes.shape[0]:
        raise ValueError(
            f"targets[{i}]['labels']: expected shape [{boxes.shape[0]}] (one per box), got {tuple(labels.shape)}"
        )
    return labels.reshape(-1).long()


def _overlaps(
    targets, anchors: Tensor, batch_size: int, num_classes: Optional[int], min_iou: float,
    cache: Optional[AnchorIndexCache],
) -> _Overlaps:
    """Validate the targets and find what both matchers read (see :class:`_Overlaps`): the pairs
    with IoU >= ``min_iou`` (the lower threshold: below it every anchor is background whatever
    its best box), and for every box its best IoU and the anchors reaching it."""
    pairs = check_targets(targets, batch_size, num_classes)
    num_a, dev = anchors.shape[1], anchors.device
    counts = torch.tensor([b.shape[0] for b, _ in pairs], dtype=torch.int64, device=dev)
    dtype = torch.float32
    for b, _ in pairs:
        dtype = torch.promote_types(dtype, b.dtype)
    if pairs and int(counts.sum()) > 0:
        boxes = torch.cat([b.detach().to(device=dev, dtype=dtype) for b, _ in pairs])
        labels = torch.cat([_labels_or_zeros(i, b, lb).to(dev) for i, (b, lb) in enumerate(pairs)])
    else:
        boxes = torch.zeros((0, 4), dtype=dtype, device=dev)
        labels = torch.zeros(0, dtype=torch.int64, device=dev)
    num_boxes = boxes.shape[0]
    image = torch.repeat_interleave(torch.arange(batch_size, device=dev), counts)
    first_box = torch.cumsum(counts, 0) - counts
    local = torch.arange(num_boxes, device=dev) - first_box.index_select(0, image)
    ov = _Overlaps(batch_size, num_a, anchors, boxes, labels, counts, image, local, first_box)
    if cache is not None and num_boxes and num_a:
        ov.index = cache.get(anchors)
    pb, slot, iou = ov.pairs(torch.arange(num_boxes, device=dev), min_iou)
    ov.anchor_best, ov.anchor_match = _first_best(batch_size * num_a, slot, iou, local.index_select(0, pb))
    box_best = torch.zeros(num_boxes, dtype=iou.dtype, device=dev).scatter_reduce(0, pb, iou, "amax")
    found = [(pb, slot, iou)]
    # Boxes whose every IoU is below min_iou: search again at half the IoU each time (each
    # search prunes by that bound), the last time through every overlap.
    low, t = (box_best == 0).nonzero().squeeze(1), float(min_iou)
    while low.numel() and t > 0:
        t = t / 2 if t / 2 >= _MIN_PRUNED_IOU else 0.0
        qb, qslot, qiou = ov.pairs(low, t)
        box_best.scatter_reduce_(0, qb, qiou, "amax")
        found.append((qb, qslot, qiou))
        low = low[box_best.index_select(0, low) == 0]
    pb, slot, iou = (torch.cat(x) for x in zip(*found))
    at = (iou == box_best.index_select(0, pb)).nonzero().squeeze(1)
    ov.box_best, ov.best_box, ov.best_slot = box_best, pb[at], slot[at]
    return ov


def _assignment(ov: _Overlaps, matched: Tensor, ignore: Optional[Tensor], extras: Dict[str, Tensor]) -> Assignment:
    """The Assignment of a dense ``matched`` ``[B * A]`` (-1, -2 or the local box index)."""
    b, a = ov.batch_size, ov.num_anchors
    matched = torch.where(ov.has_boxes.repeat_interleave(a), matched, torch.full_like(matched, BACKGROUND))
    flat = (matched >= 0).nonzero().squeeze(1)
    target = matched[flat]
    row = ov.first_box[flat // a] + target
    extras = dict(extras, max_iou=ov.anchor_best.view(b, a))
    return Assignment(
        batch_index=flat // a,
        pred_index=flat % a,
        target_index=target,
        boxes=ov.boxes[row],
        labels=ov.labels[row],
        weights=torch.ones(flat.shape[0], dtype=ov.boxes.dtype, device=flat.device),
        batch_size=b,
        num_preds=a,
        ignore=None if ignore is None else (ignore & ov.has_boxes[:, None]),
        extras=extras,
    )


def _check_threshold(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite number, got {value!r}")
    return float(value)


def assign_iou(
    targets: Sequence[Dict[str, Tensor]],
    anchors: AnchorsLike,
    *,
    fg_iou_thresh: float = 0.5,
    bg_iou_thresh: float = 0.4,
    allow_low_quality_matches: bool = True,
    num_classes: Optional[int] = None,
    index_cache: Optional[AnchorIndexCache] = None,
) -> Assignment:
    """torchvision's ``Matcher(fg_iou_thresh, bg_iou_thresh, allow_low_quality_matches)`` on
    ``box_iou(boxes, anchors)`` of every image (module docstring).

    Args:
        targets: per image ``{"boxes": [n, 4] xyxy pixels, "labels": [n] int64}``.
        anchors: ``[A, 4]`` for every image, or one ``[A, 4]`` per image (:func:`check_anchors`).
        fg_iou_thresh, bg_iou_thresh: torchvision's ``high_threshold`` / ``low_threshold``
            (RetinaNet's 0.5 / 0.4); IoU exactly ``bg_iou_thresh`` is ignored, exactly
            ``fg_iou_thresh`` positive.
        allow_low_quality_matches: give every box its best anchors (RetinaNet: True).
        num_classes: when given, labels are checked to lie in ``[0, num_classes)``.
        index_cache: an :class:`AnchorIndexCache` to keep the anchors' index between calls.

    Returns:
        an :class:`~detloss.assign.base.Assignment`: positives (boxes: the matched box, xyxy
        pixels; labels; weights 1), ``ignore`` the between-threshold anchors, extras
        ``max_iou`` ``[B, A]`` (each anchor's best IoU where it reaches ``bg_iou_thresh``, else 0)
        and ``low_quality`` bool ``[B, A]``
        (positives that only the low-quality rule made positive), ``ignore_target`` ``[B, A]`` (the
        best box of each ignored anchor, -1 elsewhere).
    """
    fg = _check_threshold("fg_iou_thresh", fg_iou_thresh)
    bg = _check_threshold("bg_iou_thresh", bg_iou_thresh)
    if bg > fg:
        raise ValueError(f"bg_iou_thresh: expected a value <= fg_iou_thresh {fg}, got {bg}")
    batch = len(targets) if isinstance(targets, (list, tuple)) else 0
    anchors_t = check_anchors(anchors, batch)
    ov = _overlaps(targets, anchors_t, batch, num_classes, max(bg, 0.0), index_cache)
    v, m = ov.anchor_best, ov.anchor_match
    matched = torch.where(v >= fg, m, torch.where(v >= bg, torch.full_like(m, IGNORED), torch.full_like(m, BACKGROUND)))
    low_quality = torch.zeros_like(matched, dtype=torch.bool)
    if allow_low_quality_matches and ov.boxes.shape[0]:
        # Every anchor at some box's best IoU goes back to its own best box m(a); where v(a) is
        # below the searched IoU, m(a) comes from all the boxes of its image.
        low_quality[ov.best_slot] = True
        need = (low_quality & (v == 0)).nonzero().squeeze(1)
        if need.numel():
            # Each such anchor reaches at least the best IoU of a box that chose it.
            lower = torch.zeros_like(v).scatter_reduce(0, ov.best_slot, ov.box_best.index_select(0, ov.best_box), "amax")
            m = m.clone()
            m[need] = ov.own_match(need, lower.index_select(0, need))
        # A box without any overlap has best IoU 0, reached by every anchor of its image.
        blind = ov.image[ov.box_best == 0].unique()
        if blind.numel():
            a = ov.num_anchors
            rows = (blind[:, None] * a + torch.arange(a, device=blind.device)).reshape(-1)
            m = m.clone()
            m[rows] = ov.image_match(blind)
            low_quality[rows] = True
        low_quality &= matched != m
        matched = torch.where(low_quality, m, matched)
    shape = (ov.batch_size, ov.num_anchors)
    ignored = (matched == IGNORED).view(shape)
    extras = {
        "low_quality": low_quality.view(shape),
        "ignore_target": torch.where(ignored, ov.anchor_match.view(shape), torch.full_like(ignored, -1, dtype=torch.int64)),
    }
    return _assignment(ov, matched, ignored, extras)


def assign_ssd(
    targets: Sequence[Dict[str, Tensor]],
    anchors: AnchorsLike,
    *,
    iou_thresh: float = 0.5,
    num_classes: Optional[int] = None,
    index_cache: Optional[AnchorIndexCache] = None,
) -> Assignment:
    """torchvision's ``SSDMatcher(iou_thresh)`` on ``box_iou(boxes, anchors)`` of every image
    (module docstring).

    Args:
        targets: per image ``{"boxes": [n, 4] xyxy pixels, "labels": [n] int64}``.
        anchors: ``[A, 4]`` default boxes for every image, or one ``[A, 4]`` per image.
        iou_thresh: IoU from which an anchor is a positive of its best box (SSD's 0.5).
        num_classes: when given, labels are checked to lie in ``[0, num_classes)``.
        index_cache: an :class:`AnchorIndexCache` to keep the anchors' index between calls.

    Returns:
        an :class:`~detloss.assign.base.Assignment` without ignore mask; extras ``max_iou``
        ``[B, A]`` (each anchor's best IoU where it reaches ``iou_thresh``, else 0), ``forced`` bool
        ``[B, A]`` (anchors given to a box as its best anchor) and ``best_anchor`` ``[T]`` (that
        anchor of every box of the batch, image by image).
    """
    thresh = _check_threshold("iou_thresh", iou_thresh)
    batch = len(targets) if isinstance(targets, (list, tuple)) else 0
    anchors_t = check_anchors(anchors, batch)
    ov = _overlaps(targets, anchors_t, batch, num_classes, max(thresh, 0.0), index_cache)
    v, m = ov.anchor_best, ov.anchor_match
    matched = torch.where(v >= thresh, m, torch.full_like(m, BACKGROUND))
    # Each box's best anchor: the lowest anchor index at its best IoU (anchor 0 without overlap).
    a = ov.num_anchors
    best_anchor = torch.full((ov.boxes.shape[0],), a, dtype=torch.int64, device=v.device)
    best_anchor = best_anchor.scatter_reduce(0, ov.best_box, ov.best_slot % a, "amin")
    best_anchor = torch.where(best_anchor < a, best_anchor, torch.zeros_like(best_anchor))
    winner = torch.full_like(matched, -1).scatter_reduce(0, ov.image * a + best_anchor, ov.local, "amax")
    forced = winner >= 0
    matched = torch.where(forced, winner, matched)
    shape = (ov.batch_size, a)
    return _assignment(ov, matched, None, {"forced": forced.view(shape), "best_anchor": best_anchor})
