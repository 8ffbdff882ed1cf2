r"""SSD loss: softmax cross-entropy with hard negative mining and smooth-L1 box regression.

Liu et al. 2016, "SSD: Single Shot MultiBox Detector" (arXiv:1512.02325), section 2.2, as
torchvision 0.29 writes it: ``models/detection/ssd.py`` (``SSD.forward``'s matching, here
:func:`detloss.assign.iou_matcher.assign_ssd`, and ``SSD.compute_loss``). With ``N = max(1,
positives of the batch)`` (positives: ``matched_idxs >= 0``), ``t`` the class target of every
anchor (the matched box's label, 0 = background otherwise) and ``CE`` the cross-entropy over all
``C`` logits (class 0 the background):

.. math::
    L_{cls} = \frac{1}{N}\Bigl(\sum_{a:\,t_a > 0} \mathrm{CE}_a + \sum_{a \in M} \mathrm{CE}_a\Bigr),
    \qquad
    L_{box} = \frac{1}{N} \sum_{a\ \mathrm{positive}} \sum_{4\ \mathrm{codes}}
              \mathrm{smoothL1}_{\beta=1}\bigl(t_a - e(g_a, a)\bigr)

with ``e`` the :class:`~detloss.box_coder.BoxCoder` encoding with weights (10, 10, 5, 5) and ``M``
the mined negatives of each image: its anchors ranked by ``CE`` (anchors with ``t > 0`` set to
``-inf``) in descending order, those of rank ``< k`` where ``k = neg_to_pos_ratio x`` (the image's
anchors with ``t > 0``), computed as torchvision does: a Python float times an int64 tensor, in
torch's default dtype (float32), not rounded. An image without positives mines nothing; when
``k`` reaches the number of anchors every anchor is mined, positives included (their ``CE`` then
counts twice). Among equal losses at the cut-off torchvision's (unstable) sort picks some; so does
this loss (the value is the same, the gradient goes to other rows of equal logits).

``reduce_across_ranks=True`` (distributed): ``N = max(1, mean over ranks of the positives)``, so
that DDP's averaged gradient is the whole global batch's (when it has at least one positive per
rank); torchvision itself normalizes per rank.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import functional as F
from ..kernels._runtime import empty_gradient
from ..assign.base import Assignment
from ..assign.iou_matcher import AnchorIndexCache, AnchorsLike, assign_ssd
from ..anchor_generators import DefaultBoxGenerator
from ..box_coder import BBOX_XFORM_CLIP, BoxCoder
from ._anchor_heads import (
    AnchorHeadHooks,
    AnchorHeadInputs,
    AnchorLayout,
    check_anchor_heads,
    decode_anchor_boxes,
    positive_stats,
)
from .base import Decoded, DetectionLoss
from .retinanet import check_num_classes

__all__ = ["SSDLoss", "mine_hard_negatives"]


def mine_hard_negatives(cls_loss: Tensor, positive: Tensor, neg_to_pos_ratio: float) -> Tensor:
    """torchvision SSD's hard negative mining: bool ``[B, A]`` of the mined anchors.

    ``cls_loss`` ``[B, A]`` the per-anchor cross-entropy, ``positive`` bool ``[B, A]`` the anchors
    with a class target above 0. Per image, ``k = neg_to_pos_ratio * positives`` (in torch's
    default dtype, as torchvision computes it); mined are the anchors of rank ``< k`` when the
    loss with positives set to ``-inf`` is sorted in descending order (a top-k, without sorting
    all anchors)."""
    b, a = cls_loss.shape
    k = torch.ceil(float(neg_to_pos_ratio) * positive.sum(1)).clamp(min=0, max=a).long()
    mined = torch.zeros((b, a), dtype=torch.bool, device=cls_loss.device)
    k_max = int(k.max()) if b else 0
    if k_max:
        ranked = cls_loss.detach().masked_fill(positive, -float("inf")).topk(k_max, dim=1).indices
        take = torch.arange(k_max, device=cls_loss.device)[None, :] < k[:, None]
        mined[torch.arange(b, device=cls_loss.device)[:, None].expand(b, k_max)[take], ranked[take]] = True
    return mined


#: Rows of logits per step of :func:`per_anchor_cross_entropy` (a few MB of log-probabilities).
CE_ROWS = 8192


def per_anchor_cross_entropy(logits: Tensor, target: Tensor, rows: int = CE_ROWS) -> Tensor:
    """``[N]`` the cross-entropy of each row of ``logits [N, C]`` against ``target [N]``, without
    gradient: ``-log_softmax(logits)[n, target[n]]``, the same numbers as torch's
    ``cross_entropy(..., reduction="none")`` (``log_softmax`` then ``nll_loss``), computed a block
    of rows at a time so that the ``[N, C]`` log-probabilities are never held at once."""
    out = torch.empty(logits.shape[0], dtype=logits.dtype, device=logits.device)
    for start in range(0, logits.shape[0], rows):
        block = torch.log_softmax(logits[start : start + rows], dim=1)
        out[start : start + rows] = block.gather(1, target[start : start + rows, None]).squeeze(1).neg_()
    return out


class MinedCrossEntropy(torch.autograd.Function):
    r"""``sum_r w_r CE_r`` over the rows ``rows`` of ``logits [R, C]`` (targets ``target``, integer
    weights ``count``), its value from the rows' cross-entropy ``ce`` computed beforehand (the same
    numbers the mining ranked, :func:`per_anchor_cross_entropy`).

    Backward writes the dense ``[R, C]`` gradient once: zeros, and on the counted rows torch's
    log-softmax backward of ``-w_r`` at the target, ``w_r (softmax(x_r) - onehot(t_r))``, computed
    with torch's own kernel on those rows only, so the numbers are those of autograd through
    ``cross_entropy`` over every row. The gradient buffer comes from
    :func:`~detloss.kernels._runtime.empty_gradient` (huge pages where the system allows). With
    ``create_graph=True`` the same operations run out of place, differentiable."""

    @staticmethod
    def forward(ctx, logits: Tensor, rows: Tensor, target: Tensor, count: Tensor, ce: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(logits, rows, target, count)
        return (ce * count.to(ce.dtype)).sum()

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        logits, rows, target, count = ctx.saved_tensors
        higher = torch.is_grad_enabled()
        logp = torch.log_softmax(logits.index_select(0, rows), dim=1)
        weight = count.to(logp.dtype) * grad_output
        seed = torch.zeros_like(logp)
        seed = seed.scatter(1, target[:, None], -weight[:, None]) if higher else seed.scatter_(1, target[:, None], -weight[:, None])
        rows_grad = torch._log_softmax_backward_data(seed, logp, 1, logp.dtype)
        if higher:
            return torch.zeros_like(logits).index_copy(0, rows, rows_grad), None, None, None, None
        grad = empty_gradient(logits)
        grad.zero_()
        return grad.index_copy_(0, rows, rows_grad), None, None, None, None


#: SSD300's feature strides (VGG-16 conv4_3 .. the 1 x 1 extra layer; its default boxes' steps).
SSD300_STRIDES = (8, 16, 32, 64, 100, 300)


class SSDLoss(AnchorHeadHooks, DetectionLoss):
    """SSD's loss, equal to torchvision's ``SSD.compute_loss`` (module docstring).

    Args:
        num_classes: ``C``, the width of ``cls_logits``, background (class 0) included
            (torchvision's ``num_classes``).
        iou_thresh: the matcher's IoU threshold (torchvision's 0.5).
        neg_to_pos_ratio: mined negatives per positive (torchvision's
            ``(1 - positive_fraction) / positive_fraction`` = 3.0 for its default 0.25).
        bbox_reg_weights: the box coder's ``(wx, wy, ww, wh)`` (SSD's (10, 10, 5, 5)).
        bbox_xform_clip: the decoder's clamp of the log size ratio (``log(1000 / 16)``).
        gains: multipliers of the terms ``{"cls": 1.0, "box": 1.0}``.
        reduce_across_ranks: normalize by the positives of all ranks (module docstring).
        default_box_generator, strides, image_size: the default-box layout of the tools' hooks
            (``prior_outputs``, ``prediction_levels``): a
            :class:`~detloss.anchor_generators.DefaultBoxGenerator` (default SSD300's), the
            feature strides and the input size; ``forward`` does not read them. YOLO-row
            targets of the tools get label ``class + 1`` (class 0 is the background).

    The loss keeps the search index of the anchors between calls while the anchors it is given
    stay equal (compared at every call; :class:`~detloss.assign.iou_matcher.AnchorIndexCache`).

    Call ``out = loss_fn(cls_logits [B, A, C], bbox_regression [B, A, 4], anchors, targets)``
    with ``anchors`` the default boxes (one ``[A, 4]`` xyxy pixel tensor per image, or one for
    all) and ``targets`` per image ``{"boxes": [n, 4] xyxy pixels, "labels": [n] int64 in [0, C)}``.
    Returns a :class:`~detloss.LossOutput`: ``components`` ``"cls"`` and ``"box"``
    (torchvision's ``"classification"`` and ``"bbox_regression"``), ``total`` their sum, ``terms``
    with their graph; ``stats``: ``num_pos``, ``num_targets``, ``iou_mean``, ``normalizer``
    (``N``), ``num_mined``, ``num_pos_per_image``, ``matched_idxs`` (torchvision's per-image
    list) and ``mined`` (bool ``[B, A]``, the mined anchors).
    """

    name: ClassVar[str] = "ssd"
    background_classes: ClassVar[int] = 1
    first_label = 1
    term_methods: ClassVar[Dict[str, str]] = {"cls": "cls_term", "box": "box_term"}

    def __init__(
        self,
        num_classes: int,
        iou_thresh: float = 0.5,
        neg_to_pos_ratio: float = 3,
        bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0),
        *,
        bbox_xform_clip: float = BBOX_XFORM_CLIP,
        gains: Optional[Mapping[str, float]] = None,
        reduce_across_ranks: bool = False,
        default_box_generator: Optional[DefaultBoxGenerator] = None,
        strides: Sequence[float] = SSD300_STRIDES,
        image_size: Optional[Tuple[int, int]] = None,
    ) -> None:
        super().__init__({"cls": 1.0, "box": 1.0} if gains is None else gains, reduce_across_ranks=reduce_across_ranks)
        generator = DefaultBoxGenerator.ssd300() if default_box_generator is None else default_box_generator
        self.layout = AnchorLayout(generator, strides, image_size)
        self.num_classes = check_num_classes(num_classes)
        self.iou_thresh = float(iou_thresh)
        ratio = float(neg_to_pos_ratio)
        if not ratio >= 0 or ratio == float("inf"):
            raise ValueError(f"neg_to_pos_ratio: expected a finite number >= 0, got {neg_to_pos_ratio!r}")
        self.neg_to_pos_ratio = ratio
        self.box_coder = BoxCoder(bbox_reg_weights, bbox_xform_clip)
        # The default boxes' search index, kept between calls while they stay the same.
        self._index_cache = AnchorIndexCache()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, iou_thresh={self.iou_thresh}, "
            f"neg_to_pos_ratio={self.neg_to_pos_ratio}, bbox_reg_weights={self.box_coder.weights}"
        )

    # ------------------------------------------------------------------ steps
    def check(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: AnchorsLike, targets) -> AnchorHeadInputs:
        return check_anchor_heads(self.num_classes, cls_logits, bbox_regression, anchors, targets)

    def assignment(self, inputs: AnchorHeadInputs, prepared: Any) -> Assignment:
        asg = assign_ssd(
            inputs.targets, inputs.anchors, iou_thresh=self.iou_thresh, num_classes=self.num_classes,
            index_cache=self._index_cache,
        )
        # Hard negative mining reads the head, not only the boxes; it is part of the assignment.
        b, a, c = inputs.cls_logits.shape
        with torch.no_grad():
            target = torch.zeros(b * a, dtype=torch.int64, device=inputs.cls_logits.device)
            target[asg.flat_index] = asg.labels
            ce = per_anchor_cross_entropy(inputs.cls_logits.detach().reshape(b * a, c), target)
            positive = (target > 0).view(b, a)
            asg.extras["mined"] = mine_hard_negatives(ce.view(b, a), positive, self.neg_to_pos_ratio)
            asg.extras["class_target"] = target.view(b, a)
            asg.extras["cross_entropy"] = ce.view(b, a)
        return asg

    def gather(self, inputs: AnchorHeadInputs, prepared: Any, assignment: Assignment) -> Tensor:
        """The normalizer ``N`` (the one cross-rank reduction with ``reduce_across_ranks``)."""
        n = torch.tensor(float(assignment.num_pos), dtype=inputs.dtype, device=inputs.cls_logits.device)
        return self.global_mean(n).clamp(min=1.0)

    def cls_term(self, inputs: AnchorHeadInputs, normalizer: Tensor, assignment: Assignment) -> Tensor:
        b, a, c = inputs.cls_logits.shape
        target = assignment.extras["class_target"].reshape(-1)
        count = (target > 0).to(torch.int64) + assignment.extras["mined"].reshape(-1).to(torch.int64)
        rows = count.nonzero().squeeze(1)
        ce = assignment.extras["cross_entropy"].reshape(-1).index_select(0, rows)
        logits = inputs.cls_logits.reshape(b * a, c)
        return MinedCrossEntropy.apply(logits, rows, target.index_select(0, rows), count.index_select(0, rows), ce) / normalizer

    def box_term(self, inputs: AnchorHeadInputs, normalizer: Tensor, assignment: Assignment) -> Tensor:
        target = self.box_coder.encode(assignment.boxes.to(inputs.dtype), inputs.anchors_of(assignment))
        loss = F.smooth_l1_loss(inputs.codes_of(assignment), target, beta=1.0, reduction="sum")
        return loss / normalizer

    def stats(self, inputs: AnchorHeadInputs, normalizer: Tensor, assignment: Assignment, raw: Dict[str, Tensor]):
        out = positive_stats(inputs, assignment, self.box_coder)
        out["normalizer"] = normalizer
        out["num_mined"] = assignment.extras["mined"].sum()
        out["mined"] = assignment.extras["mined"]
        return out

    def assignment_notes(self, assignment: Assignment) -> List[str]:
        at = (assignment.batch_index, assignment.pred_index)
        iou = assignment.extras["max_iou"][at].tolist()
        forced = assignment.extras["forced"][at].tolist()
        return [
            ("forced: the box's best default box" if f else f"IoU {v:.2f} >= iou_thresh {self.iou_thresh:g}")
            for v, f in zip(iou, forced)
        ]

    def decode(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: AnchorsLike) -> Decoded:
        """SSD's inference decoding: boxes from the codes on the default boxes, class scores
        ``softmax(cls_logits)`` (column 0 the background)."""
        boxes = decode_anchor_boxes(self.box_coder, bbox_regression, anchors)
        return Decoded(boxes=boxes, scores=torch.softmax(cls_logits.to(boxes.dtype), dim=-1))
