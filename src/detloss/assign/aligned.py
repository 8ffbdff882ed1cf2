"""Task-aligned assignment (TOOD) with a scheme's own candidates and overlaps: the engine of the
rotated, pose and segmentation assigners of ultralytics 8.4.

Every task-aligned assigner of ultralytics 8.4 ``utils/tal.py`` (``TaskAlignedAssigner`` and its
subclasses ``RotatedTaskAlignedAssigner``, ``PoseTaskAlignedAssigner``,
``SegTaskAlignedAssigner``) runs the same selection and differs only in two places:

- **candidates**: which (box, anchor) pairs may match (the anchor inside the box, rotated or
  not; for pose also the pyramid level that fits the box size);
- **overlap** of a candidate pair (CIoU; ProbIoU; keypoint OKS; (IoU + mask IoU) / 2).

Given them, with ``t = score(anchor, class(box)) ** alpha * overlap ** beta``:

1. each box keeps its ``topk`` candidates of largest ``t``;
2. an anchor kept by several boxes goes to the candidate box of largest overlap (first box on
   ties), whether or not that box had kept it;
3. with ``topk2`` each box then keeps its ``topk2`` best positives by ``t``;
4. the soft class target of a positive is ``t * max_pos overlap(box, .) / (max_pos t(box, .) + eps)``.

:class:`AlignedAssigner` enumerates the candidates and computes this over them only (memory
grows with the candidates, not with ``B * M * A``; only a box with fewer than ``topk``
candidates of non-zero ``t`` gets a dense row of all anchors) and returns the
:class:`~detloss.assign.tal.TALAssignment` the YOLO losses read. Subclasses implement
:meth:`AlignedAssigner.candidates` and :meth:`AlignedAssigner.overlaps`.

Ties at zero. The reference takes each box's top-k with ``torch.topk`` over all anchors; a box
with fewer than ``topk`` candidates of non-zero ``t`` fills its remaining slots with anchors of
``t = 0`` in ``torch.topk``'s own (unspecified, device-dependent) order, and those that are
candidates become positives of target score 0. They do not change the box, class, DFL and
angle terms, but they count in the unweighted means of the pose and mask terms, so by default
(``zero_ties=True``) they are picked here the same way, by ``torch.topk`` over that box's dense
row (likewise for ``topk2``). ``zero_ties=False`` never makes them positives (deterministic),
the rule of :mod:`detloss.assign.tal`, whose detection loss does not depend on them.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import functional as fn
from .._checks import check_floating, check_tensor
from ..anchors import Level
from .base import rank_in_group
from .tal import TALAssignment, _candidate_pairs, _result, enlarge_small_boxes

__all__ = ["AlignedAssigner", "BoxTaskAlignedAssigner", "CandidatePairs", "select_aligned", "topk_ties", "box_ciou"]


def topk_ties(box: Tensor, anchor: Tensor, value: Tensor, needy: Tensor, k: int, n_anchor: int) -> Tensor:
    """bool ``[C]``: the pairs of the boxes marked ``needy`` (bool ``[n_box]``) that ``torch.topk``
    picks among the ``k`` largest of their box's dense row (``value`` at its pairs' anchors, 0 at
    every other anchor): the reference's choice, zeros included, in torch's tie order."""
    rows = torch.cumsum(needy, 0) - 1  # row of each needy box
    sel = needy[box].nonzero().squeeze(1)
    dense = torch.zeros((int(needy.sum()), n_anchor), dtype=value.dtype, device=value.device)
    dense[rows[box[sel]], anchor[sel]] = value[sel]
    top = torch.topk(dense, min(k, n_anchor), dim=-1).indices
    picked = torch.zeros_like(dense, dtype=torch.bool).scatter_(-1, top, True)
    out = torch.zeros(box.shape[0], dtype=torch.bool, device=box.device)
    out[sel] = picked[rows[box[sel]], anchor[sel]]
    return out


def select_aligned(
    box: Tensor,
    flat: Tensor,
    metric: Tensor,
    overlap: Tensor,
    n_box: int,
    n_anchor: int,
    n_flat: int,
    topk: int,
    topk2: int,
    eps: float,
    zero_ties: bool = True,
) -> Tuple[Tensor, Tensor]:
    """Steps 1-4 of the module docstring over candidate pairs sorted by box: ``box`` (index of the
    valid box), ``flat`` (the anchor's index over the batch, ``image * A + anchor``), ``metric`` and
    ``overlap`` per pair. Returns ``(pos, norm)``: the positive pairs (indices into the candidates,
    one per foreground anchor) and their soft target value.

    ``zero_ties``: a box with fewer than ``topk`` (``topk2``) candidates (positives) of non-zero
    alignment also keeps the zero-alignment ones ``torch.topk`` picks over its dense row of all
    anchors, as the reference does (their target score is 0, but they count in the pose and mask
    terms' means over positives); False: they never become positives."""
    dev = box.device
    anchor = flat % n_anchor
    nz = (metric > 0).nonzero().squeeze(1)
    pre = nz[rank_in_group(box[nz], metric[nz], num_groups=n_box) < topk]
    if zero_ties:
        needy = torch.bincount(box[nz], minlength=n_box) < min(topk, n_anchor)
        if bool(needy.any()):
            fill = topk_ties(box, anchor, metric, needy, topk, n_anchor) & (metric == 0)
            pre = torch.cat((pre, fill.nonzero().squeeze(1)))
    claims = torch.bincount(flat[pre], minlength=n_flat)
    owner = torch.zeros(n_flat, dtype=torch.long, device=dev)
    owner[flat[pre]] = box[pre]
    multi = claims > 1
    if bool(multi.any()):
        on_multi = multi[flat].nonzero().squeeze(1)
        win = on_multi[rank_in_group(flat[on_multi], overlap[on_multi], num_groups=n_flat) == 0]
        owner[flat[win]] = box[win]
    fg = claims > 0
    pos = (fg[flat] & (owner[flat] == box)).nonzero().squeeze(1)
    if topk2 != topk:
        keep = (rank_in_group(box[pos], metric[pos], num_groups=n_box) < topk2) & (metric[pos] > 0)
        if zero_ties:
            needy = torch.bincount(box[pos[metric[pos] > 0]], minlength=n_box) < min(topk2, n_anchor)
            needy &= torch.bincount(box[pos], minlength=n_box) > 0
            if bool(needy.any()):
                keep |= topk_ties(box[pos], anchor[pos], metric[pos], needy, topk2, n_anchor) & (metric[pos] == 0)
        pos = pos[keep]
    pos_box = box[pos]
    best_metric = torch.zeros(n_box, dtype=metric.dtype, device=dev).scatter_reduce_(0, pos_box, metric[pos], "amax")
    best_overlap = torch.zeros(n_box, dtype=metric.dtype, device=dev).scatter_reduce_(0, pos_box, overlap[pos], "amax")
    norm = metric[pos] * best_overlap[pos_box] / (best_metric[pos_box] + eps)
    return pos, norm


class AlignedAssigner:
    """Task-aligned assignment with pluggable candidates and overlaps (see the module docstring).

    Args (ultralytics 8.4's values as its task losses set them):
        topk: candidates kept per box (10; end-to-end one-to-one: 7).
        num_classes: ``nc``.
        alpha, beta: exponents of the class score and the overlap (0.5, 6.0).
        eps: the reference's 1e-9.
        topk2: positives kept per box after resolving shared anchors (None = ``topk``; 1 for the
            one-to-one branch of YOLO26).
        strides: the level strides.
        min_side: box sides shorter than this are widened to it for the candidate test only
            (ultralytics 8.4: ``strides[1]``); None: no widening.
        zero_ties: the reference's handling of boxes with fewer than ``topk`` candidates of
            non-zero alignment (True, default): they also keep the zero-alignment candidates
            ``torch.topk`` picks among the tied zeros of their row of all anchors, in torch's own
            (device-dependent) order; those positives have target score 0 but count in the
            unweighted pose and mask terms. False: zero-alignment candidates never become
            positives (deterministic; the box, class and angle terms are the same either way).

    :meth:`assign` takes ``pd_scores [B, A, nc]`` (probabilities), ``pd_bboxes [B, A, K]`` (the
    scheme's box format, pixels), ``gt_labels [B, M]`` int64, ``gt_bboxes [B, M, K]``, ``mask_gt
    [B, M]`` bool, the ``levels`` ``[(h, w, stride)]`` the anchors are laid out on (level by
    level, row-major) and the scheme's extra tensors; it returns a
    :class:`~detloss.assign.tal.TALAssignment` (``boxes``, ``target_bboxes``: the assigned
    ``gt_bboxes`` rows). No gradient flows through it.
    """

    #: Width of a box row (4: xyxy; 5: xywhr).
    box_dim = 4

    def __init__(
        self,
        topk: int = 10,
        num_classes: int = 80,
        *,
        alpha: float = 0.5,
        beta: float = 6.0,
        eps: float = 1e-9,
        topk2: Optional[int] = None,
        strides: Sequence[float] = (8, 16, 32),
        min_side: Optional[float] = 16.0,
        zero_ties: bool = True,
    ) -> None:
        for name, v, lo in (("topk", topk, 1), ("num_classes", num_classes, 1)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
        if topk2 is not None and (not isinstance(topk2, int) or isinstance(topk2, bool) or topk2 < 1):
            raise ValueError(f"topk2: expected None or an int >= 1, got {topk2!r}")
        if not strides or any(not s > 0 for s in strides):
            raise ValueError(f"strides: expected positive numbers, got {tuple(strides)!r}")
        if min_side is not None and not min_side > 0:
            raise ValueError(f"min_side: expected None or a positive number, got {min_side!r}")
        self.topk = topk
        self.topk2 = topk if topk2 is None else topk2
        self.num_classes = num_classes
        self.alpha, self.beta, self.eps = float(alpha), float(beta), float(eps)
        self.strides = tuple(float(s) for s in strides)
        self.min_side = None if min_side is None else float(min_side)
        self.zero_ties = bool(zero_ties)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(topk={self.topk}, num_classes={self.num_classes}, alpha={self.alpha}, "
            f"beta={self.beta}, topk2={self.topk2}, min_side={self.min_side})"
        )

    # ------------------------------------------------------------------ the scheme's two steps
    def candidates(self, boxes: Tensor, img: Tensor, levels: Sequence[Level], **extra: Any) -> Tuple[Tensor, Tensor]:
        """Candidate pairs of the valid boxes ``boxes [n, K]`` (of images ``img [n]``): ``(box,
        anchor)`` int64, sorted by box."""
        raise NotImplementedError

    def overlaps(self, pairs: "CandidatePairs", **extra: Any) -> Tensor:
        """Overlap ``[C]`` (>= 0) of each candidate pair."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the assignment
    @torch.no_grad()
    def assign(
        self,
        pd_scores: Tensor,
        pd_bboxes: Tensor,
        gt_labels: Tensor,
        gt_bboxes: Tensor,
        mask_gt: Tensor,
        levels: Sequence[Level],
        **extra: Any,
    ) -> TALAssignment:
        lazy = not isinstance(pd_scores, Tensor)  # an object giving the scores where asked (gather_scores)
        for name, t in (("pd_scores", pd_scores), ("pd_bboxes", pd_bboxes), ("gt_bboxes", gt_bboxes)):
            if not (lazy and name == "pd_scores"):
                check_floating(name, t)
        check_tensor("gt_labels", gt_labels)
        check_tensor("mask_gt", mask_gt)
        if len(pd_scores.shape) != 3 or pd_scores.shape[-1] != self.num_classes:
            raise ValueError(f"pd_scores: expected shape [B, A, {self.num_classes}], got {tuple(pd_scores.shape)}")
        bsz, n_anchor, _ = pd_scores.shape
        k = self.box_dim
        if tuple(pd_bboxes.shape) != (bsz, n_anchor, k):
            raise ValueError(f"pd_bboxes: expected shape {(bsz, n_anchor, k)}, got {tuple(pd_bboxes.shape)}")
        if gt_bboxes.ndim != 3 or gt_bboxes.shape[0] != bsz or gt_bboxes.shape[2] != k:
            raise ValueError(f"gt_bboxes: expected shape [{bsz}, M, {k}], got {tuple(gt_bboxes.shape)}")
        m = gt_bboxes.shape[1]
        if tuple(gt_labels.shape) != (bsz, m) or tuple(mask_gt.shape) != (bsz, m):
            raise ValueError(
                f"gt_labels, mask_gt: expected shape {(bsz, m)}, got {tuple(gt_labels.shape)}, {tuple(mask_gt.shape)}"
            )
        if sum(h * w for h, w, _ in levels) != n_anchor:
            raise ValueError(f"levels: expected sizes totalling A={n_anchor} anchors, got {list(levels)}")
        if m == 0:  # one invalid slot: nothing is assigned, and the outputs keep their shapes
            gt_labels = gt_labels.new_zeros((bsz, 1))
            gt_bboxes = gt_bboxes.new_zeros((bsz, 1, k))
            mask_gt = mask_gt.new_zeros((bsz, 1))
        img, row = mask_gt.nonzero(as_tuple=True)  # valid boxes, image-major
        boxes, labels = gt_bboxes[img, row], gt_labels[img, row]
        box, anchor = self.candidates(boxes, img, levels, **extra)
        pairs = CandidatePairs(box, anchor, img[box], row[box], boxes, levels)
        if lazy:
            score = pd_scores.gather_scores(pairs.img, anchor, labels[box])
        else:
            score = pd_scores[pairs.img, anchor, labels[box]]
        overlap = self.overlaps(pairs, pd_scores=pd_scores, pd_bboxes=pd_bboxes, score=score, **extra)
        metric = score.pow(self.alpha) * overlap.pow(self.beta)
        flat = pairs.img * n_anchor + anchor
        pos, norm = select_aligned(box, flat, metric, overlap, img.numel(), n_anchor, bsz * n_anchor, self.topk, self.topk2,
                                   self.eps, self.zero_ties)
        dev = pd_bboxes.device
        fg = torch.zeros(bsz * n_anchor, dtype=torch.bool, device=dev)
        fg[flat[pos]] = True
        dense_norm = torch.zeros(bsz * n_anchor, dtype=metric.dtype, device=dev)
        dense_norm[flat[pos]] = norm
        target_gt_idx = torch.zeros(bsz * n_anchor, dtype=torch.long, device=dev)
        target_gt_idx[flat[pos]] = pairs.row[pos]
        shape = (bsz, n_anchor)
        return _result(gt_labels, gt_bboxes, target_gt_idx.view(shape), fg.view(shape), dense_norm.view(shape),
                       self.num_classes)


class CandidatePairs:
    """The candidate pairs of one assignment: ``box`` (valid box), ``anchor`` (0 .. A-1), ``img``
    and ``row`` (the box's image and row of ``gt_bboxes``), the valid ``boxes [n, K]`` and the
    ``levels``; ``len()`` is the number of pairs."""

    __slots__ = ("box", "anchor", "img", "row", "boxes", "levels")

    def __init__(self, box: Tensor, anchor: Tensor, img: Tensor, row: Tensor, boxes: Tensor, levels: Sequence[Level]) -> None:
        self.box, self.anchor, self.img, self.row, self.boxes, self.levels = box, anchor, img, row, boxes, levels

    def __len__(self) -> int:
        return int(self.box.shape[0])

    def level_strides(self, dtype: torch.dtype) -> Tensor:
        """``[C]`` the stride of each pair's anchor."""
        ends = torch.tensor([h * w for h, w, _ in self.levels], device=self.anchor.device).cumsum(0)
        lvl = torch.bucketize(self.anchor, ends, right=True)
        return torch.tensor([s for _, _, s in self.levels], dtype=dtype, device=self.anchor.device)[lvl]


def box_ciou(gt: Tensor, pd: Tensor) -> Tensor:
    """CIoU of xyxy pairs as the task-aligned assigners measure it (ultralytics ``bbox_iou``), at least 0."""
    return fn.aligned_box_iou(gt, pd, kind="ciou", convention="yolov5", validate=False).clamp(min=0)


class BoxTaskAlignedAssigner(AlignedAssigner):
    """The detection rule (ultralytics ``TaskAlignedAssigner``) on this engine: candidates are the
    anchors strictly inside the xyxy box (sides shorter than ``min_side`` widened), the overlap
    is the CIoU. It gives :class:`~detloss.assign.tal.TaskAlignedAssigner`'s assignment except
    for the zero-alignment ties (``zero_ties``), which the pose and segmentation losses of
    YOLOv8 depend on; the pose and segmentation assigners of YOLO26 refine it."""

    def candidates(self, boxes: Tensor, img: Tensor, levels: Sequence[Level], **extra: Any) -> Tuple[Tensor, Tensor]:
        return _candidate_pairs(enlarge_small_boxes(boxes, self.min_side), levels, self.eps)

    def overlaps(self, pairs: "CandidatePairs", *, pd_bboxes: Tensor, **extra: Any) -> Tensor:
        return box_ciou(pairs.boxes[pairs.box], pd_bboxes[pairs.img, pairs.anchor])
