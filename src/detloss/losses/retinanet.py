r"""RetinaNet loss: sigmoid focal classification and anchor-box regression, per-image normalized.

Lin et al. 2017, "Focal Loss for Dense Object Detection" (arXiv:1708.02002), as torchvision 0.29
writes it: ``models/detection/retinanet.py`` ``RetinaNet.compute_loss`` (the matching, here
:func:`detloss.assign.iou_matcher.assign_iou`), ``RetinaNetClassificationHead.compute_loss``,
``RetinaNetRegressionHead.compute_loss`` and ``_utils._box_loss``. For image ``i`` with ``F_i``
positive anchors (``matched_idxs >= 0``), ``V_i`` the anchors that are not ignored
(``matched_idxs != -2``), ``y`` the one-hot class target (all zeros on background) and ``B`` the
batch size:

.. math::
    L_{cls} = \frac{1}{B}\sum_i \frac{1}{\max(1, F_i)} \sum_{a \in V_i}\sum_c
              \mathrm{FL}_{\alpha,\gamma}(x_{ac}, y_{ac}), \qquad
    L_{box} = \frac{1}{B}\sum_i \frac{1}{\max(1, F_i)} \sum_{a \in F_i} \ell_{box}(a)

with the focal loss ``FL`` (:func:`detloss.functional.sigmoid_focal_loss`, alpha 0.25,
gamma 2) and ``l_box`` one of ``"l1"`` (torchvision's default): ``|t - e(g, a)|`` summed over the
four codes, ``e`` the :class:`~detloss.box_coder.BoxCoder` encoding of the matched box ``g`` on
the anchor; ``"smooth_l1"`` the same with smooth L1 (beta 1); ``"giou"`` / ``"diou"`` /
``"ciou"``: ``1 - IoU_kind(d(t, a), g)`` of the decoded box (torchvision's eps 1e-7). Note the
normalization per image (FCOS and SSD divide by the batch's positives).

No batch-wide normalizer: under DistributedDataParallel each rank's loss is the mean over its
images, and averaging over ranks gives the mean over the global batch when ranks hold equal
batches; nothing needs reducing across ranks.
"""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import functional as F
from .. import kernels
from .._checks import check_choice
from ..functional._common import check_unit_interval
from ..assign.base import Assignment
from ..assign.iou_matcher import AnchorIndexCache, AnchorsLike, assign_iou
from ..anchor_generators import AnchorGenerator
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

__all__ = ["RetinaNetLoss", "BOX_LOSSES"]

#: ``box_loss`` choices, torchvision's ``bbox_reg_loss_type``.
BOX_LOSSES = ("l1", "smooth_l1", "giou", "ciou", "diou")


def check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
    return num_classes


#: RetinaNet's backbone strides (ResNet-FPN P3-P7).
RETINANET_STRIDES = (8, 16, 32, 64, 128)


class RetinaNetLoss(AnchorHeadHooks, DetectionLoss):
    """RetinaNet's loss, equal to torchvision's ``RetinaNet.compute_loss`` (module docstring).

    Args:
        num_classes: ``C``, the width of ``cls_logits`` (torchvision's ``num_classes``).
        fg_iou_thresh, bg_iou_thresh: the matcher's thresholds (torchvision's 0.5, 0.4).
        allow_low_quality_matches: give every box its best anchors (torchvision: True).
        box_loss: ``"l1"`` (default) | ``"smooth_l1"`` | ``"giou"`` | ``"ciou"`` | ``"diou"``.
        bbox_reg_weights: the box coder's ``(wx, wy, ww, wh)`` (RetinaNet's (1, 1, 1, 1)).
        focal_alpha, focal_gamma: the focal loss's alpha and gamma (0.25, 2.0, fixed in torchvision).
        bbox_xform_clip: the decoder's clamp of the log size ratio (``log(1000 / 16)``).
        gains: multipliers of the terms ``{"cls": 1.0, "box": 1.0}``.
        anchor_generator, strides, image_size: the anchor layout of the tools' hooks
            (``prior_outputs``, ``prediction_levels``): a
            :class:`~detloss.anchor_generators.AnchorGenerator` (default RetinaNet's), the
            backbone's strides (P3-P7) and the input size; ``forward`` does not read them.
        reduce_across_ranks: accepted like every detector loss's; it changes nothing here, there
            being no batch-wide normalizer (module docstring).

    The loss keeps the search index of the anchors between calls while the anchors it is given
    stay equal (compared at every call; :class:`~detloss.assign.iou_matcher.AnchorIndexCache`).

    Call ``out = loss_fn(cls_logits [B, A, C], bbox_regression [B, A, 4], anchors, targets)``:
    ``anchors`` one ``[A, 4]`` xyxy pixel tensor per image (torchvision's list) or one for all;
    ``targets`` per image ``{"boxes": [n, 4] xyxy pixels, "labels": [n] int64 in [0, C)}``.
    Returns a :class:`~detloss.LossOutput`: ``components`` ``"cls"`` and ``"box"``
    (torchvision's ``"classification"`` and ``"bbox_regression"``), ``total`` their sum,
    ``terms`` the same with their graph; ``stats``: ``num_pos``, ``num_targets``, ``iou_mean``
    (decoded positives vs their boxes), ``normalizer`` (the mean of the per-image divisors
    ``max(1, F_i)``), ``num_ignored``, ``num_pos_per_image`` and ``matched_idxs`` (torchvision's
    per-image list: box index, -1 background, -2 between the thresholds).
    """

    name: ClassVar[str] = "retinanet"
    term_methods: ClassVar[Dict[str, str]] = {"cls": "cls_term", "box": "box_term"}

    def __init__(
        self,
        num_classes: int,
        fg_iou_thresh: float = 0.5,
        bg_iou_thresh: float = 0.4,
        allow_low_quality_matches: bool = True,
        box_loss: str = "l1",
        bbox_reg_weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        *,
        bbox_xform_clip: float = BBOX_XFORM_CLIP,
        gains: Optional[Mapping[str, float]] = None,
        anchor_generator: Optional[AnchorGenerator] = None,
        strides: Sequence[float] = RETINANET_STRIDES,
        image_size: Optional[Tuple[int, int]] = None,
        reduce_across_ranks: bool = False,
    ) -> None:
        super().__init__({"cls": 1.0, "box": 1.0} if gains is None else gains, reduce_across_ranks=reduce_across_ranks)
        self.layout = AnchorLayout(AnchorGenerator() if anchor_generator is None else anchor_generator, strides, image_size)
        self.num_classes = check_num_classes(num_classes)
        self.fg_iou_thresh, self.bg_iou_thresh = float(fg_iou_thresh), float(bg_iou_thresh)
        if not self.bg_iou_thresh <= self.fg_iou_thresh:
            raise ValueError(f"bg_iou_thresh: expected a value <= fg_iou_thresh {fg_iou_thresh}, got {bg_iou_thresh!r}")
        self.allow_low_quality_matches = bool(allow_low_quality_matches)
        self.box_loss = check_choice("box_loss", box_loss, BOX_LOSSES)
        self.box_coder = BoxCoder(bbox_reg_weights, bbox_xform_clip)
        self.focal_alpha = check_unit_interval("focal_alpha", focal_alpha, sentinels=(-1.0,))
        self.focal_gamma = float(focal_gamma)
        if not self.focal_gamma >= 0:
            raise ValueError(f"focal_gamma: expected a number >= 0, got {focal_gamma!r}")
        # The anchors' search index, kept between calls while the anchors stay the same.
        self._index_cache = AnchorIndexCache()

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, fg_iou_thresh={self.fg_iou_thresh}, "
            f"bg_iou_thresh={self.bg_iou_thresh}, allow_low_quality_matches={self.allow_low_quality_matches}, "
            f"box_loss={self.box_loss!r}, bbox_reg_weights={self.box_coder.weights}"
        )

    # ------------------------------------------------------------------ steps
    def check(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: AnchorsLike, targets) -> AnchorHeadInputs:
        return check_anchor_heads(self.num_classes, cls_logits, bbox_regression, anchors, targets)

    def assignment(self, inputs: AnchorHeadInputs, prepared: Any) -> Assignment:
        return assign_iou(
            inputs.targets,
            inputs.anchors,
            fg_iou_thresh=self.fg_iou_thresh,
            bg_iou_thresh=self.bg_iou_thresh,
            allow_low_quality_matches=self.allow_low_quality_matches,
            num_classes=self.num_classes,
            index_cache=self._index_cache,
        )

    @staticmethod
    def _image_weight(inputs: AnchorHeadInputs, assignment: Assignment) -> Tensor:
        """``[B]``: ``1 / (B max(1, F_i))``, the weight of every summand of image ``i``."""
        fg = torch.bincount(assignment.batch_index, minlength=inputs.batch_size).to(inputs.dtype)
        return 1.0 / (inputs.batch_size * fg.clamp(min=1))

    def cls_term(self, inputs: AnchorHeadInputs, prepared: Any, assignment: Assignment) -> Tensor:
        b, a, c = inputs.cls_logits.shape
        target = torch.zeros((b * a, c), dtype=inputs.dtype, device=inputs.cls_logits.device)
        target[assignment.flat_index, assignment.labels] = 1.0
        weight = self._image_weight(inputs, assignment)[:, None].expand(b, a)
        if assignment.ignore is not None:
            weight = weight * (~assignment.ignore).to(inputs.dtype)
        # The focal loss's own kernel, without its checks of the target over all B x A x C
        # entries (this one-hot target is valid by construction; alpha is checked once, above).
        logits = inputs.cls_logits.reshape(b * a, c)
        loss = kernels.fused_sigmoid_focal_loss(
            logits, target, self.focal_alpha, self.focal_gamma, "none", compiled=kernels.use_fused(logits, target)
        )
        return (loss.sum(1) * weight.reshape(-1)).sum()

    def box_term(self, inputs: AnchorHeadInputs, prepared: Any, assignment: Assignment) -> Tensor:
        codes, anchors = inputs.codes_of(assignment), inputs.anchors_of(assignment)
        gt = assignment.boxes.to(inputs.dtype)
        if self.box_loss in ("l1", "smooth_l1"):
            target = self.box_coder.encode(gt, anchors)
            if self.box_loss == "l1":
                per = F.l1_loss(codes, target, reduction="none").sum(1)
            else:
                per = F.smooth_l1_loss(codes, target, beta=1.0, reduction="none").sum(1)
        else:
            pred = self.box_coder.decode(codes, anchors)
            per = F.iou_loss(pred, gt, kind=self.box_loss, eps=1e-7, reduction="none", validate=False)
        weight = self._image_weight(inputs, assignment).index_select(0, assignment.batch_index)
        return (per * weight).sum()

    def stats(self, inputs: AnchorHeadInputs, prepared: Any, assignment: Assignment, raw: Dict[str, Tensor]):
        out = positive_stats(inputs, assignment, self.box_coder)
        out["normalizer"] = sum(max(1, n) for n in out["num_pos_per_image"]) / inputs.batch_size
        out["num_ignored"] = 0 if assignment.ignore is None else assignment.ignore.sum()
        return out

    def assignment_notes(self, assignment: Assignment) -> List[str]:
        iou = assignment.extras["max_iou"][assignment.batch_index, assignment.pred_index].tolist()
        low = assignment.extras["low_quality"][assignment.batch_index, assignment.pred_index].tolist()
        return [
            ("low-quality match: a box's best anchor" if lq else f"IoU {v:.2f} >= fg_iou_thresh {self.fg_iou_thresh:g}")
            for v, lq in zip(iou, low)
        ]

    def decode(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: AnchorsLike) -> Decoded:
        """RetinaNet's inference decoding: boxes from the codes on the anchors (torchvision's
        ``BoxCoder.decode``), class scores ``sigmoid(cls_logits)``."""
        boxes = decode_anchor_boxes(self.box_coder, bbox_regression, anchors)
        return Decoded(boxes=boxes, scores=torch.sigmoid(cls_logits.to(boxes.dtype)))
