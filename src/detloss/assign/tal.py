"""Task-aligned assigner (TOOD), as YOLOv8 / YOLO11 train with it.

Reference: Feng et al., "TOOD: Task-aligned One-stage Object Detection", ICCV 2021; the code
followed exactly is ultralytics 8.4 ``ultralytics/utils/tal.py`` ``TaskAlignedAssigner`` with
the settings ``v8DetectionLoss`` gives it (topk=10, alpha=0.5, beta=6.0, eps=1e-9).

For every ground-truth box ``g`` and anchor point ``a`` whose centre lies strictly inside ``g``
(a *candidate*; sides of ``g`` shorter than ``min_side`` are first widened to ``min_side``
about the box centre, ultralytics 8.4):

    overlap(g, a) = max(CIoU(g, pred_box(a)), 0)
    t(g, a)       = score(a, class(g)) ** alpha * overlap(g, a) ** beta

Each box keeps its ``topk`` candidates of largest ``t``. An anchor kept by several boxes goes
to the box of largest overlap among *all* boxes that contain it (first box on ties). With
``topk2`` each box then keeps only its ``topk2`` best positives. The soft class target of a
positive anchor is ``t(g, a) * max_pos overlap(g, .) / (max_pos t(g, .) + eps)``.

Two ways compute this. The dense one builds ``[B, M, A]`` tensors (M = most boxes in an image,
A = anchors) exactly as the reference does; it is kept as the ground truth and as a baseline.
The default one enumerates only the candidate pairs (the anchor grid cells inside each box),
so memory grows with the number of candidates instead of ``B * M * A``; its results are the
same (tests compare them).

Ties. The reference picks the top-k with ``torch.topk`` over all anchors, candidates or not.
When a box has fewer than ``topk`` candidates with a non-zero alignment, the remaining slots
go to anchors of alignment 0, in an order that ``torch.topk`` leaves unspecified: such an
anchor may or may not become a (zero-weight) positive. Here an alignment of exactly 0 never
wins a top-k slot, which makes the result deterministic; the loss is unaffected (those
anchors have target score 0 either way). Among equal *non-zero* alignments at the k-th place
the candidate path prefers the lower anchor index; the dense path keeps ``torch.topk``'s order.
"""
from __future__ import annotations

import math
from typing import ClassVar, Iterator, List, Optional, Sequence, Tuple

import torch

from .. import functional as fn
from .._checks import check_floating, check_tensor, compute_dtype
from .._lazy import Deferred, DeferredDict
from ..anchors import Level, grid_points, window_cells
from ..boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from .base import Assignment, rank_in_group

__all__ = ["TaskAlignedAssigner", "TALAssignment", "TAL_OUTPUTS", "OneHotScores", "enlarge_small_boxes", "anchor_grid"]

#: The reference's five outputs, in its order (what ``TALAssignment`` unpacks to).
TAL_OUTPUTS = ("target_labels", "target_bboxes", "target_scores", "fg_mask", "target_gt_idx")


class TALAssignment(Assignment):
    """What :class:`TaskAlignedAssigner` returns: an :class:`~detloss.assign.base.Assignment`
    whose positives are the foreground anchors (image-major, then anchor), plus the reference's
    dense outputs in ``extras``.

    Positives: ``pred_index`` the anchor, ``target_index`` the assigned box's row among the
    image's ``M`` rows, ``boxes`` its xyxy pixels, ``labels`` its class, ``weights`` the positive's
    normalized alignment (its target score, the weight of YOLOv8's box terms).

    ``extras`` (also attributes, and what the object unpacks to, in this order, like the
    reference's tuple ``target_labels, target_bboxes, target_scores, fg_mask, target_gt_idx``):

    - ``target_labels``: int64 ``[B, A]`` class of the assigned box (where ``fg_mask`` is False:
      the class of box ``target_gt_idx`` = 0 of that image, as the reference returns it);
    - ``target_bboxes``: ``[B, A, 4]`` xyxy of the assigned box (likewise box 0 where not fg);
    - ``target_scores``: ``[B, A, nc]`` one-hot class times the normalized alignment; 0 where not fg;
    - ``fg_mask``: bool ``[B, A]`` anchors assigned a box;
    - ``target_gt_idx``: int64 ``[B, A]`` index of the assigned box among the image's ``M`` rows;
      0 where not fg.
    """

    _fields: ClassVar[Tuple[str, ...]] = TAL_OUTPUTS

    target_labels = property(lambda self: self.extras["target_labels"])
    target_bboxes = property(lambda self: self.extras["target_bboxes"])
    target_scores = property(lambda self: self.extras["target_scores"])
    fg_mask = property(lambda self: self.extras["fg_mask"])
    target_gt_idx = property(lambda self: self.extras["target_gt_idx"])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter([self.extras[k] for k in TAL_OUTPUTS])

    def foreground(self) -> torch.Tensor:
        return self.fg_mask

    def sparse_target_scores(self) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """``(labels [B, A], scores [B, A])`` with ``target_scores[b, a, c] = scores[b, a]`` where
        ``c == labels[b, a]`` and 0 elsewhere, while ``target_scores`` has not been built (read or
        replaced): a loss can then use the one-hot form without building ``[B, A, nc]``. None
        otherwise."""
        raw = self.extras.raw("target_scores") if isinstance(self.extras, DeferredDict) else None
        if isinstance(raw, OneHotScores) and not raw.computed:
            return raw.labels, raw.scores
        return None


def enlarge_small_boxes(boxes: torch.Tensor, min_side: Optional[float]) -> torch.Tensor:
    """Widen xyxy box sides shorter than ``min_side`` to ``min_side`` about the box centre.

    The arithmetic is the reference's (xyxy -> cx, cy, w, h -> xyxy for every box), so that the
    strict inside test that follows agrees to the last bit. ``min_side=None``: boxes unchanged
    (ultralytics 8.3 and earlier).
    """
    if min_side is None:
        return boxes
    c = xyxy_to_cxcywh(boxes)
    side = torch.tensor(min_side, dtype=boxes.dtype, device=boxes.device)
    wh = c[..., 2:]
    return cxcywh_to_xyxy(torch.cat((c[..., :2], torch.where(wh < side, side, wh)), -1))


def anchor_grid(levels: Sequence[Level], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Anchor centres ``[A, 2]`` in pixels, ``((x + 0.5) * s, (y + 0.5) * s)``, level by level,
    row-major inside a level (ultralytics' ``make_anchors`` times the stride)."""
    return grid_points([(h, w) for h, w, _ in levels], [(s, s) for _, _, s in levels], dtype=dtype, device=device)


def _infer_levels(anc_points: torch.Tensor, strides: Sequence[float]) -> Optional[List[Level]]:
    """Recover the level shapes from anchors laid out as :func:`anchor_grid` does; None if the
    anchors follow another layout."""
    n = anc_points.shape[0]
    y = anc_points[:, 1]
    levels: List[Level] = []
    off = 0
    for s in strides:
        if off >= n:
            return None
        other = (y[off:] != y[off]).nonzero()
        w = int(other[0]) if other.numel() else n - off
        rows = (n - off) // w
        grid_y = y[off : off + rows * w].view(rows, w)
        want = (torch.arange(rows, dtype=y.dtype, device=y.device) + 0.5) * s
        h = int((grid_y == want[:, None]).all(1).cumprod(0).sum())
        if h == 0:
            return None
        levels.append((h, w, float(s)))
        off += h * w
    if off != n or not torch.equal(anchor_grid(levels, anc_points.dtype, anc_points.device), anc_points):
        return None
    return levels


#: The window of cells :func:`_candidate_pairs` enumerates reaches this many cells beyond the exact
#: bounds ``x / stride - 0.5``, plus :data:`WINDOW_MARGIN_REL` times the bound (rounding grows with it).
WINDOW_MARGIN = 0.01
WINDOW_MARGIN_REL = 1e-5


def _candidate_pairs(
    boxes: torch.Tensor, levels: Sequence[Level], eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """All (box, anchor) pairs with the anchor centre strictly inside the box (by more than
    ``eps``), without a dense box x anchor mask.

    For each box and level the cells in a bounding index range are enumerated
    (:func:`detloss.anchors.window_cells`), then tested exactly as the reference tests them. Cell
    ``i`` (centre ``(i + 0.5) s``) is inside ``(x1, x2)`` when ``x1 / s - 0.5 < i < x2 / s - 0.5``;
    the range is that one widened by a margin (:data:`WINDOW_MARGIN` cells plus a relative
    :data:`WINDOW_MARGIN_REL` of the coordinate) far above the rounding of these divisions, so
    that no cell the exact test accepts is left out, and little more than the candidates are
    enumerated. Returns ``(box index, anchor index)``, sorted by box, then anchor.
    """
    dev, dt = boxes.device, boxes.dtype
    n_lvl = len(levels)
    corners = boxes.view(-1, 2, 2)  # (x1, y1), (x2, y2)
    starts, counts = [], []
    for h, w, s in levels:
        u = corners / s - 0.5
        margin = u.abs() * WINDOW_MARGIN_REL + WINDOW_MARGIN
        size = corners.new_tensor([w, h])
        # first / one-past-last cell index (x, y), widened by the margin, clamped to the grid
        lo = torch.minimum(torch.floor(u[:, 0] - margin[:, 0]) + 1, size).clamp_(min=0)
        hi = torch.minimum(torch.ceil(u[:, 1] + margin[:, 1]), size).clamp_(min=0)
        starts.append(lo.long())
        counts.append((hi - lo).long())
    # windows box-major: window k is box k // n_lvl on level k % n_lvl
    blk, ix, iy = window_cells(torch.stack(starts, 1).view(-1, 2), torch.stack(counts, 1).view(-1, 2))
    lvl = blk % n_lvl
    box = torch.div(blk, n_lvl, rounding_mode="floor")
    del blk
    stride = torch.tensor([s for _, _, s in levels], dtype=dt, device=dev).index_select(0, lvl)
    ax = (ix.to(dt) + 0.5) * stride
    ay = (iy.to(dt) + 0.5) * stride
    x1, y1, x2, y2 = boxes.index_select(0, box).unbind(-1)
    inside = torch.minimum(torch.minimum(ax - x1, ay - y1), torch.minimum(x2 - ax, y2 - ay)) > eps
    del ax, ay, stride, x1, y1, x2, y2
    width = torch.tensor([w for _, w, _ in levels], device=dev)
    offset = torch.tensor([0] + [h * w for h, w, _ in levels], device=dev).cumsum(0)[:-1]
    keep = inside.nonzero().squeeze(1)  # one synchronization for both
    lvl, iy, ix = lvl.index_select(0, keep), iy.index_select(0, keep), ix.index_select(0, keep)
    return box.index_select(0, keep), offset.index_select(0, lvl) + iy * width.index_select(0, lvl) + ix


def _gather(t: torch.Tensor, i: torch.Tensor, j: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``t[i, j, k]`` for a 3-d ``t`` of any strides (e.g. scores ``[B, A, nc]`` viewed from
    ``[B, nc, A]``), read in place: one gather at the elements' storage offsets."""
    flat = t.as_strided((t.untyped_storage().nbytes() // t.element_size() - t.storage_offset(),), (1,), t.storage_offset())
    return flat.index_select(0, i * t.stride(0) + j * t.stride(1) + k * t.stride(2))


def _result(
    gt_labels: torch.Tensor,
    gt_bboxes: torch.Tensor,
    target_gt_idx: torch.Tensor,
    fg_mask: torch.Tensor,
    norm: torch.Tensor,
    num_classes: int,
) -> TALAssignment:
    """Gather the assigned boxes and classes ([B, A]), list the positives; the soft class targets
    ``[B, A, nc]`` are built when first read (:meth:`TALAssignment.sparse_target_scores` gives
    them without building them)."""
    bsz, n_anchor = fg_mask.shape
    m = gt_bboxes.shape[1]
    dev = gt_bboxes.device
    # the assigned slot of every anchor in the flattened [B * M] boxes: one row gather each
    # (index_select), where two-tensor advanced indexing costs several times more on the CPU
    slot = (torch.arange(bsz, device=dev)[:, None] * m + target_gt_idx).reshape(-1)
    labels = gt_labels.reshape(-1).index_select(0, slot).view(bsz, n_anchor).clamp(min=0)
    pos = fg_mask.reshape(-1).nonzero().squeeze(1)
    boxes_2d = gt_bboxes.reshape(bsz * m, gt_bboxes.shape[-1])  # 4 columns, or 5 (rotated boxes)
    boxes = Deferred(lambda: boxes_2d.index_select(0, slot).view(bsz, n_anchor, -1))
    return TALAssignment(
        batch_index=torch.div(pos, n_anchor, rounding_mode="floor"),
        pred_index=pos % n_anchor,
        target_index=target_gt_idx.reshape(-1).index_select(0, pos),
        boxes=boxes_2d.index_select(0, slot.index_select(0, pos)),
        labels=labels.reshape(-1).index_select(0, pos),
        weights=norm.reshape(-1).index_select(0, pos),
        batch_size=bsz,
        num_preds=n_anchor,
        extras=_extras(labels, boxes, torch.where(fg_mask, norm, 0.0), fg_mask, target_gt_idx, num_classes),
    )


class OneHotScores(Deferred):
    """The dense target scores ``[B, A, nc]`` of a task-aligned assignment, built when first read
    from what defines them: ``labels [B, A]`` and ``scores [B, A]`` (``target_scores[b, a, c] =
    scores[b, a]`` where ``c == labels[b, a]``, else 0)."""

    __slots__ = ("labels", "scores")

    def __init__(self, labels: torch.Tensor, scores: torch.Tensor, num_classes: int) -> None:
        self.labels, self.scores = labels, scores

        def dense() -> torch.Tensor:
            out = torch.zeros((*labels.shape, num_classes), dtype=scores.dtype, device=scores.device)
            return out.scatter_(-1, labels.clamp(max=num_classes - 1)[..., None], scores[..., None])

        super().__init__(dense)


def _extras(labels, boxes, scores, fg_mask, target_gt_idx, num_classes) -> DeferredDict:
    return DeferredDict(zip(TAL_OUTPUTS, (labels, boxes, OneHotScores(labels, scores, num_classes), fg_mask, target_gt_idx)))
def _raise_bad_value(name: str, t: torch.Tensor, pos: Tuple[int, ...]) -> None:
    """The error for the entry ``pos`` of ``t`` that :meth:`TaskAlignedAssigner._check` refused."""
    value = float(t[pos])
    if not math.isfinite(value):
        raise ValueError(f"{name}: expected finite values, got {value} at index {pos}")
    if name == "pd_scores":
        raise ValueError(
            f"{name}: expected probabilities in [0, 1] (sigmoid of the class logits), got {value} at index {pos}"
        )
    raise ValueError(
        f"{name}: expected xyxy boxes with x1 <= x2 and y1 <= y2, got {t[pos[:-1]].tolist()} at index {pos[:-1]}"
    )


class TaskAlignedAssigner:
    r"""Task-aligned assignment of ground-truth boxes to anchor points (TOOD / YOLOv8).

    .. math::
        t = s^\alpha \cdot u^\beta, \qquad u = \max(\mathrm{CIoU}(g, \hat b), 0)

    over the anchors whose centre is inside ``g``; top-``topk`` per box; an anchor claimed by
    several boxes goes to the one of largest ``u`` among all boxes containing it; target score
    ``t \cdot \max_{pos} u / (\max_{pos} t + \varepsilon)`` on the box's class. See the module
    docstring for the exact rules and their source (ultralytics 8.4 ``TaskAlignedAssigner``).

    Args:
        topk: candidates kept per box (10 as v8DetectionLoss sets it).
        num_classes: number of classes ``nc``.
        alpha: exponent of the class score (0.5).
        beta: exponent of the overlap (6.0).
        eps: the reference's 1e-9 (inside-box margin and normalizer guard).
        topk2: optional second cut, positives kept per box after resolving anchors claimed by
            several boxes (None = no cut; YOLO26's one-to-one branch uses 1).
        strides: level strides, used to recognise the anchor layout in ``__call__``.
        min_side: box sides shorter than this are widened to it for the inside test only
            (ultralytics 8.4: 16 px, the second stride); None = no widening (ultralytics 8.3).
        dense: compute the reference's dense way (``[B, M, A]`` tensors) instead of over the
            candidates only. Same results; for testing and benchmarking.

    Call with ``pd_scores`` ``[B, A, nc]`` (probabilities in [0, 1], the sigmoid of the class
    logits: raw logits are refused with a ValueError), ``pd_bboxes`` ``[B, A, 4]`` (xyxy pixels;
    they may be inverted, as a head predicting distances can give them, and count with their
    CIoU as in the reference), ``anc_points`` ``[A, 2]`` (pixels), ``gt_labels`` ``[B, M, 1]``,
    ``gt_bboxes`` ``[B, M, 4]`` (xyxy pixels, ``x1 <= x2`` and ``y1 <= y2`` in valid rows) and
    ``mask_gt`` ``[B, M, 1]`` (valid rows; default: rows with ``x1 + y1 + x2 + y2 > 0``, the
    reference's padding rule, which also takes a box centred at (0, 0) for padding). Errors
    name these arguments. Anchors laid out level by level, row-major,
    at cell centres (:func:`anchor_grid`) take the candidate path; any other layout, or
    ``feat_shapes`` not given and not recognisable, is computed densely. Returns a
    :class:`TALAssignment` (an :class:`~detloss.assign.base.Assignment` that also unpacks like
    the reference's five-tuple). No gradient flows through the assignment.
    """

    def __init__(
        self,
        topk: int = 10,
        num_classes: int = 80,
        alpha: float = 0.5,
        beta: float = 6.0,
        eps: float = 1e-9,
        topk2: Optional[int] = None,
        strides: Sequence[float] = (8, 16, 32),
        min_side: Optional[float] = 16.0,
        dense: bool = False,
    ) -> None:
        if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
            raise ValueError(f"topk: expected an int >= 1, got {topk!r}")
        if topk2 is not None and (not isinstance(topk2, int) or isinstance(topk2, bool) or topk2 < 1):
            raise ValueError(f"topk2: expected None or an int >= 1, got {topk2!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes: expected an int >= 1, got {num_classes!r}")
        if min_side is not None and not min_side > 0:
            raise ValueError(f"min_side: expected None or a positive number, got {min_side!r}")
        if not strides or any(not s > 0 for s in strides):
            raise ValueError(f"strides: expected positive numbers, got {tuple(strides)!r}")
        self.topk = topk
        self.topk2 = topk2 if topk2 is not None else topk
        self.num_classes = num_classes
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.eps = float(eps)
        self.strides = tuple(float(s) for s in strides)
        self.min_side = None if min_side is None else float(min_side)
        self.dense = bool(dense)

    def __repr__(self) -> str:
        return (
            f"TaskAlignedAssigner(topk={self.topk}, num_classes={self.num_classes}, alpha={self.alpha}, "
            f"beta={self.beta}, topk2={self.topk2}, min_side={self.min_side}, dense={self.dense})"
        )

    # ------------------------------------------------------------------ public entry point
    @torch.no_grad()
    def __call__(
        self,
        pd_scores: torch.Tensor,
        pd_bboxes: torch.Tensor,
        anc_points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_bboxes: torch.Tensor,
        mask_gt: Optional[torch.Tensor] = None,
        feat_shapes: Optional[Sequence[Tuple[int, int]]] = None,
    ) -> TALAssignment:
        pd_scores, pd_bboxes, anc_points, labels, gt_bboxes, mask = self._check(
            pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt
        )
        levels: Optional[List[Level]] = None
        if feat_shapes is not None:
            if len(feat_shapes) != len(self.strides):
                raise ValueError(
                    f"feat_shapes: expected {len(self.strides)} (h, w) pairs (one per stride), got {len(feat_shapes)}"
                )
            levels = [(int(h), int(w), s) for (h, w), s in zip(feat_shapes, self.strides)]
            if sum(h * w for h, w, _ in levels) != anc_points.shape[0]:
                raise ValueError(
                    f"feat_shapes: expected sizes totalling A={anc_points.shape[0]} anchors, got {list(feat_shapes)}"
                )
        elif not self.dense:
            levels = _infer_levels(anc_points, self.strides)
        return self.assign(pd_scores, pd_bboxes, anc_points, labels, gt_bboxes, mask, levels)

    def assign(
        self,
        pd_scores: torch.Tensor,
        pd_bboxes: torch.Tensor,
        anc_points: torch.Tensor,
        gt_labels: torch.Tensor,
        gt_bboxes: torch.Tensor,
        mask_gt: torch.Tensor,
        levels: Optional[Sequence[Level]] = None,
    ) -> TALAssignment:
        """Assignment on checked inputs: ``gt_labels`` int64 ``[B, M]``, ``mask_gt`` bool
        ``[B, M]``, floats in one dtype; ``levels`` ``[(h, w, stride), ...]`` matching
        ``anc_points`` selects the candidate path (unless ``dense``).

        ``pd_scores`` may also be an object that gives the probabilities on demand (``shape``
        ``(B, A, nc)``, ``dtype``, ``device``, ``scores()``: the ``[B, A, nc]`` tensor, and
        ``gather_scores(image, anchor, cls)``: those entries), as YOLOv8Loss passes its head maps:
        the candidate path then reads only the candidate pairs' scores, never all ``[B, A, nc]``."""
        bsz, n_anchor, nc = pd_scores.shape
        if gt_bboxes.shape[1] == 0:  # the reference's early return
            dev = pd_scores.device
            zeros = torch.zeros((bsz, n_anchor), dtype=torch.long, device=dev)
            extras = _extras(torch.full_like(zeros, nc), torch.zeros_like(pd_bboxes),
                             torch.zeros((bsz, n_anchor), dtype=pd_scores.dtype, device=dev),
                             zeros.bool(), zeros, nc)
            empty = Assignment.empty(bsz, n_anchor, dtype=pd_scores.dtype, device=dev)
            return TALAssignment(**{**vars(empty), "extras": extras})
        if self.dense or levels is None:
            if not isinstance(pd_scores, torch.Tensor):
                pd_scores = pd_scores.scores()
            idx, fg, norm = self._dense(pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt)
        else:
            idx, fg, norm = self._sparse(pd_scores, pd_bboxes, levels, gt_labels, gt_bboxes, mask_gt)
        return _result(gt_labels, gt_bboxes, idx, fg, norm, self.num_classes)

    # ------------------------------------------------------------------ checks
    def _check(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt):
        for name, t in (("pd_scores", pd_scores), ("pd_bboxes", pd_bboxes), ("anc_points", anc_points), ("gt_bboxes", gt_bboxes)):
            check_floating(name, t)
        check_tensor("gt_labels", gt_labels)
        if pd_scores.ndim != 3 or pd_scores.shape[-1] != self.num_classes:
            raise ValueError(f"pd_scores: expected shape [B, A, {self.num_classes}], got {tuple(pd_scores.shape)}")
        bsz, n_anchor = pd_scores.shape[:2]
        if tuple(pd_bboxes.shape) != (bsz, n_anchor, 4):
            raise ValueError(f"pd_bboxes: expected shape {(bsz, n_anchor, 4)}, got {tuple(pd_bboxes.shape)}")
        if tuple(anc_points.shape) != (n_anchor, 2):
            raise ValueError(f"anc_points: expected shape {(n_anchor, 2)}, got {tuple(anc_points.shape)}")
        if gt_bboxes.ndim != 3 or gt_bboxes.shape[0] != bsz or gt_bboxes.shape[2] != 4:
            raise ValueError(f"gt_bboxes: expected shape [{bsz}, M, 4], got {tuple(gt_bboxes.shape)}")
        m = gt_bboxes.shape[1]
        if gt_labels.ndim == 3 and gt_labels.shape[-1] == 1:
            gt_labels = gt_labels[..., 0]
        if tuple(gt_labels.shape) != (bsz, m):
            raise ValueError(f"gt_labels: expected shape [{bsz}, {m}, 1] or [{bsz}, {m}], got {tuple(gt_labels.shape)}")
        if mask_gt is None:
            mask = gt_bboxes.sum(-1) > 0
        else:
            check_tensor("mask_gt", mask_gt)
            if mask_gt.ndim == 3 and mask_gt.shape[-1] == 1:
                mask_gt = mask_gt[..., 0]
            if tuple(mask_gt.shape) != (bsz, m):
                raise ValueError(f"mask_gt: expected shape [{bsz}, {m}, 1] or [{bsz}, {m}], got {tuple(mask_gt.shape)}")
            mask = mask_gt.bool()
        dt = compute_dtype(pd_scores, pd_bboxes, gt_bboxes, anc_points)
        tensors = [t.detach().to(dt) for t in (pd_scores, pd_bboxes, anc_points, gt_bboxes)]
        for name, t in zip(("pd_scores", "pd_bboxes", "anc_points", "gt_bboxes"), tensors):
            bad = ~torch.isfinite(t)
            if name == "pd_scores":  # probabilities: a raw logit would pass the power alpha as NaN or > 1
                bad = bad | (t < 0) | (t > 1)
            if name == "gt_bboxes":
                bad = (bad | (t[..., 2:] < t[..., :2]).repeat(1, 1, 2)) & mask[..., None]
            if bool(bad.any()):
                pos = tuple(int(i) for i in bad.nonzero()[0])
                _raise_bad_value(name, t, pos)
        labels = gt_labels.detach()
        if labels.is_floating_point():
            if bool((labels != labels.round())[mask].any()):
                raise ValueError("gt_labels: expected integer class indices, got a fractional value")
        labels = labels.long()
        bad = mask & ((labels < 0) | (labels >= self.num_classes))
        if bool(bad.any()):
            b, j = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"gt_labels: expected classes in [0, {self.num_classes - 1}], got {int(labels[b, j])} "
                f"at image {b}, row {j}"
            )
        labels = torch.where(mask, labels, 0)
        return tensors[0], tensors[1], tensors[2], labels, tensors[3], mask

    # ------------------------------------------------------------------ the dense way
    def _dense(self, pd_scores, pd_bboxes, anc_points, gt_labels, gt_bboxes, mask_gt):
        """The reference's computation over ``[B, M, A]``. Returns (target_gt_idx, fg, norm)."""
        bsz, n_anchor, _ = pd_scores.shape
        m = gt_bboxes.shape[1]
        boxes = enlarge_small_boxes(gt_bboxes, self.min_side)
        lt, rb = boxes[:, :, None, :2], boxes[:, :, None, 2:]
        deltas = torch.cat((anc_points - lt, rb - anc_points), dim=-1)  # [B, M, A, 4]
        mask_in = (deltas.amin(-1) > self.eps) & mask_gt[..., None]
        del deltas
        bi = torch.arange(bsz, device=pd_scores.device)[:, None].expand(bsz, m)
        scores = torch.zeros((bsz, m, n_anchor), dtype=pd_scores.dtype, device=pd_scores.device)
        overlaps = torch.zeros_like(scores)
        scores[mask_in] = pd_scores.permute(0, 2, 1)[bi, gt_labels][mask_in]
        pd = pd_bboxes[:, None].expand(bsz, m, n_anchor, 4)[mask_in]
        gt = gt_bboxes[:, :, None].expand(bsz, m, n_anchor, 4)[mask_in]
        overlaps[mask_in] = fn.aligned_box_iou(gt, pd, kind="ciou", convention="yolov5", validate=False).clamp(min=0)
        del pd, gt
        metric = scores.pow(self.alpha) * overlaps.pow(self.beta)
        del scores

        top = torch.topk(metric, min(self.topk, n_anchor), dim=-1).indices
        mask_pos = torch.zeros_like(mask_in).scatter_(-1, top, True) & mask_in & (metric > 0)
        claims = mask_pos.sum(1)
        if bool((claims > 1).any()):
            best = overlaps.argmax(1)
            is_best = torch.zeros_like(mask_pos).scatter_(1, best[:, None], True)
            mask_pos = torch.where((claims > 1)[:, None], is_best, mask_pos)
        if self.topk2 != self.topk:
            kept_metric = metric * mask_pos
            top = torch.topk(kept_metric, min(self.topk2, n_anchor), dim=-1).indices
            mask_pos = mask_pos & torch.zeros_like(mask_pos).scatter_(-1, top, True) & (kept_metric > 0)
        fg = mask_pos.any(1)
        target_gt_idx = mask_pos.to(torch.uint8).argmax(1)

        metric = metric * mask_pos
        pos_metric = metric.amax(-1, keepdim=True)
        pos_overlap = (overlaps * mask_pos).amax(-1, keepdim=True)
        norm = (metric * pos_overlap / (pos_metric + self.eps)).amax(1)
        return target_gt_idx, fg, norm

    # ------------------------------------------------------------------ over candidates only
    def _sparse(self, pd_scores, pd_bboxes, levels, gt_labels, gt_bboxes, mask_gt):
        """Same result as :meth:`_dense`, computed over the (box, anchor) candidate pairs.

        Two host synchronizations (the number of window cells and of candidates, in
        :func:`_candidate_pairs`): every slot of ``gt_bboxes`` is a box (the invalid ones get no
        candidate), and the top-k, the anchors claimed by several boxes and the positives are
        masks over the candidates, reduced by scatters, instead of subsets."""
        bsz, n_anchor, nc = pd_scores.shape
        m = gt_bboxes.shape[1]
        dev = pd_scores.device
        n_box = bsz * m
        img = torch.arange(bsz, device=dev).repeat_interleave(m)  # box slots, image-major
        row = torch.arange(m, device=dev).repeat(bsz)
        boxes = gt_bboxes.reshape(n_box, 4)
        box_label = gt_labels.reshape(n_box)
        # an invalid slot lies far outside the image: its windows are empty
        far = -2.0 * max(max(h, w) * s for h, w, s in levels) - 1.0
        window_boxes = torch.where(mask_gt.reshape(n_box, 1), enlarge_small_boxes(boxes, self.min_side), far)
        box, anchor = _candidate_pairs(window_boxes, levels, self.eps)
        cand_img = img.index_select(0, box)
        flat = cand_img * n_anchor + anchor  # anchor index over the batch
        overlap = fn.aligned_box_iou(
            boxes.index_select(0, box), pd_bboxes.reshape(-1, 4).index_select(0, flat), kind="ciou",
            convention="yolov5", validate=False,
        ).clamp(min=0)
        cand_label = box_label.index_select(0, box)
        if isinstance(pd_scores, torch.Tensor):
            score = _gather(pd_scores, cand_img, anchor, cand_label)
        else:
            score = pd_scores.gather_scores(cand_img, anchor, cand_label)
        del cand_label
        del cand_img
        metric = score.pow(self.alpha) * overlap.pow(self.beta)
        del score
        n_flat = bsz * n_anchor

        # top-k per box among candidates of non-zero alignment (those rank after the others)
        pre = (rank_in_group(box, metric, num_groups=n_box) < self.topk) & (metric > 0)
        claims = torch.zeros(n_flat, dtype=torch.long, device=dev).index_add_(0, flat, pre.long())
        # the owner of an anchor: its one claimant, or, claimed by several, the box of largest
        # overlap among all boxes containing it, the first box on ties (candidates are in box order)
        none = torch.full((n_flat,), n_box, dtype=torch.long, device=dev)
        single = none.clone().scatter_reduce_(0, flat, torch.where(pre, box, n_box), "amin")
        best = torch.zeros(n_flat, dtype=overlap.dtype, device=dev).scatter_reduce_(0, flat, overlap, "amax")
        first_best = none.scatter_reduce_(0, flat, torch.where(overlap == best[flat], box, n_box), "amin")
        owner = torch.where(claims > 1, first_best, single)
        del single, first_best, best
        pos = (claims[flat] > 0) & (owner[flat] == box)
        if self.topk2 != self.topk:
            pos &= (rank_in_group(box, torch.where(pos, metric, -1.0), num_groups=n_box) < self.topk2) & (metric > 0)
        del claims, owner

        zero = metric.new_zeros(())
        pos_metric = metric.new_zeros(n_box).scatter_reduce_(0, box, torch.where(pos, metric, zero), "amax")
        pos_overlap = metric.new_zeros(n_box).scatter_reduce_(0, box, torch.where(pos, overlap, zero), "amax")
        value = torch.where(pos, metric * pos_overlap[box] / (pos_metric[box] + self.eps), zero)
        # each anchor has at most one positive candidate and every value is >= 0: a max puts it there
        norm = metric.new_zeros(n_flat).scatter_reduce_(0, flat, value, "amax")
        fg = torch.zeros(n_flat, dtype=torch.bool, device=dev).index_put_((flat,), pos, accumulate=True)
        target_gt_idx = torch.zeros(n_flat, dtype=torch.long, device=dev).scatter_reduce_(
            0, flat, torch.where(pos, row[box], 0), "amax"
        )
        shape = (bsz, n_anchor)
        return target_gt_idx.view(shape), fg.view(shape), norm.view(shape)
