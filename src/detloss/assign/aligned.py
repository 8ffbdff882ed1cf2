"""Task-aligned assignment (TOOD) with a scheme's own candidates and overlaps: the engine of the
rotated, pose and segmentation assigners of ultralytics 8.4.

Every task-aligned assigner of ultralytics 8.4 ``utils/tal.py`` (``TaskAlignedAssigner`` and its
subclasses ``RotatedTaskAlignedAssigner``, ``PoseTaskAlignedAssigner``,
``SegTaskAlignedAssigner``) runs the same selection and differs only in two places:

- **candidates**: which (box, anchor) pairs may match (the anchor inside the box, rotated or
  not; for pose also the pyramid level that fits the box size);
- **overlap** of a candidate pair (CIoU; ProbIoU; keypoint OKS; (IoU + mask IoU) / 2).

Given them, with ``t = score(anchor, class(box)) ** alpha * overlap ** beta``:

1. each box keeps its ``topk`` candidates of largest ``t`` (of ``t > 0``);
2. an anchor kept by several boxes goes to the candidate box of largest overlap (first box on
   ties), whether or not that box had kept it;
3. with ``topk2`` each box then keeps its ``topk2`` best positives by ``t``;
4. the soft class target of a positive is ``t * max_pos overlap(box, .) / (max_pos t(box, .) + eps)``.

:class:`AlignedAssigner` enumerates the candidates and computes this over them only (memory
grows with the candidates, not with ``B * M * A``) and returns the
:class:`~detloss.assign.tal.TALAssignment` the YOLO losses read. Subclasses implement
:meth:`AlignedAssigner.candidates` and :meth:`AlignedAssigner.overlaps`. Zero-alignment
candidates never become positives (the reference's ``torch.topk`` may hand them leftover slots
in an unspecified order; see :mod:`detloss.assign.tal`).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._checks import check_floating, check_tensor
from ..anchors import Level
from .base import rank_in_group
from .tal import TALAssignment, _result

__all__ = ["AlignedAssigner", "CandidatePairs", "select_aligned"]


def select_aligned(
    box: Tensor,
    flat: Tensor,
    metric: Tensor,
    overlap: Tensor,
    n_box: int,
    n_flat: int,
    topk: int,
    topk2: int,
    eps: float,
) -> Tuple[Tensor, Tensor]:
    """Steps 1-4 of the module docstring over candidate pairs sorted by box: ``box`` (index of the
    valid box), ``flat`` (the anchor's index over the batch, ``image * A + anchor``), ``metric`` and
    ``overlap`` per pair. Returns ``(pos, norm)``: the positive pairs (indices into the candidates,
    one per foreground anchor) and their soft target value."""
    dev = box.device
    nz = (metric > 0).nonzero().squeeze(1)
    pre = nz[rank_in_group(box[nz], metric[nz]) < topk]
    claims = torch.bincount(flat[pre], minlength=n_flat)
    owner = torch.zeros(n_flat, dtype=torch.long, device=dev)
    owner[flat[pre]] = box[pre]
    multi = claims > 1
    if bool(multi.any()):
        on_multi = multi[flat].nonzero().squeeze(1)
        win = on_multi[rank_in_group(flat[on_multi], overlap[on_multi]) == 0]
        owner[flat[win]] = box[win]
    fg = claims > 0
    pos = (fg[flat] & (owner[flat] == box)).nonzero().squeeze(1)
    if topk2 != topk:
        pos = pos[(rank_in_group(box[pos], metric[pos]) < topk2) & (metric[pos] > 0)]
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
        for name, t in (("pd_scores", pd_scores), ("pd_bboxes", pd_bboxes), ("gt_bboxes", gt_bboxes)):
            check_floating(name, t)
        check_tensor("gt_labels", gt_labels)
        check_tensor("mask_gt", mask_gt)
        if pd_scores.ndim != 3 or pd_scores.shape[-1] != self.num_classes:
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
        score = pd_scores[pairs.img, anchor, labels[box]]
        overlap = self.overlaps(pairs, pd_scores=pd_scores, pd_bboxes=pd_bboxes, score=score, **extra)
        metric = score.pow(self.alpha) * overlap.pow(self.beta)
        flat = pairs.img * n_anchor + anchor
        pos, norm = select_aligned(box, flat, metric, overlap, img.numel(), bsz * n_anchor, self.topk, self.topk2, self.eps)
        fg = torch.zeros(bsz * n_anchor, dtype=torch.bool, device=pd_scores.device)
        fg[flat[pos]] = True
        dense_norm = torch.zeros(bsz * n_anchor, dtype=metric.dtype, device=pd_scores.device)
        dense_norm[flat[pos]] = norm
        target_gt_idx = torch.zeros(bsz * n_anchor, dtype=torch.long, device=pd_scores.device)
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
