r"""Instance-segmentation losses: YOLOv8-seg / YOLO11-seg (ultralytics ``v8SegmentationLoss``) and
YOLO26-seg (``SegmentLoss26``, mask-aware assignment and a semantic term).

Source: ultralytics 8.4 ``ultralytics/utils/loss.py`` (``v8SegmentationLoss``,
``SegmentLoss26``, ``BCEDiceLoss``), ``utils/tal.py`` (``SegTaskAlignedAssigner``),
``utils/ops.py`` (``crop_mask``); YOLACT (Bolya et al. 2019, arXiv:1904.02689).

The detection terms are those of :class:`~detloss.losses.yolov8.YOLOv8Loss`. The head predicts
``nm`` mask coefficients per anchor and ``nm`` prototype masks per image; a positive's mask
logits are ``coefficients @ prototypes`` (the prototypes bilinearly resized to the target masks'
size when it differs). With ``P`` positive anchors (not weighted by the target scores), the
target box ``b`` of each in mask pixels and its area ``a`` as a fraction of the image::

    seg = sum_{p in pos} mean_{ij} [ij in b_p] BCEWithLogits(mask logit_pij, target mask_pij) / a_p / P
    sem = 0.5 * mean BCE(semantic logits, one-hot classes) + 0.5 * Dice      (YOLO26; only with positives)
    total = (box, seg, cls, dfl[, sem] times their gains, summed) * batch_size

The target mask of a positive is its target's own binary mask (one per target), or, with
overlapping masks (``overlap_masks=True``, ultralytics' default), the pixels of the image's
instance-index map equal to the target's index within its image plus 1. ultralytics weights
``seg`` and ``sem`` by its box gain; here each has its own gain (default 7.5, the box gain).
The semantic targets are the class of each pixel covered by an instance (the one-hot of
``sem_masks``, 0 where no instance mask covers the pixel), nearest-resized to the semantic logits.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF
from torch import Tensor

from .. import functional as F
from .._checks import check_floating, check_tensor
from ..assign.base import Assignment
from ..assign.segment import SegTaskAlignedAssigner
from ..boxes import image_slots
from ._rows import gather_rows
from .tasks import aligned_assignment, box_assigner, flatten_level_maps
from .yolov8 import YOLOv8Decoding, YOLOv8Inputs, YOLOv8Loss

__all__ = ["YOLOv8SegmentLoss", "YOLO26SegmentLoss", "SegmentInputs"]



@dataclass
class SegmentInputs(YOLOv8Inputs):
    """:class:`~detloss.losses.yolov8.YOLOv8Inputs` plus ``pred_coef [B, A, nm]``, ``proto
    [B, nm, h, w]``, the target ``masks`` (``[B, Hm, Wm]`` index maps or ``[N, Hm, Wm]`` binary),
    ``row_slot [N]`` (each target's index within its image) and, for YOLO26, the semantic logits
    ``semantic [B, nc, hs, ws]`` and class maps ``sem_masks [B, Hm, Wm]``."""

    pred_coef: Optional[Tensor] = None
    proto: Optional[Tensor] = None
    masks: Optional[Tensor] = None
    row_slot: Optional[Tensor] = None
    semantic: Optional[Tensor] = None
    sem_masks: Optional[Tensor] = None


class YOLOv8SegmentLoss(YOLOv8Loss):
    """Segmentation loss equal to ultralytics 8.4 ``v8SegmentationLoss`` (formula and source in the
    module docstring); the arguments of :class:`~detloss.losses.yolov8.YOLOv8Loss`, plus
    (keyword-only): ``num_masks`` (``nm``, 32; None: the prototypes' channel count), ``overlap_masks`` (True: the targets' masks come
    as one instance-index map per image, ultralytics' ``overlap_mask``), ``seg`` (gain, 7.5),
    ``zero_ties`` (the reference's zero-alignment positives, True; see :mod:`detloss.assign.aligned`:
    they count in the mask term's mean).

    Call ``loss_fn(feats, mask_coef, proto, targets, masks)``: ``feats`` as for YOLOv8Loss,
    ``mask_coef`` per level ``[B, nm, H, W]``, ``proto`` ``[B, nm, h, w]``, ``targets`` rows
    ``[N, 6]``, ``masks`` ``[B, Hm, Wm]`` (overlap: value ``j + 1`` on the pixels of the image's
    ``j``-th target, in ``targets`` order, 0 elsewhere) or ``[N, Hm, Wm]`` (one 0/1 mask per
    target row), with the image's aspect ratio. Components "box", "seg", "cls", "dfl" (or "l1").
    """

    name = "yolov8-seg"

    def __init__(self, num_classes: int, strides: Sequence[float] = (8, 16, 32), reg_max: int = 16, box: float = 7.5,
                 cls: float = 0.5, dfl: float = 1.5, tal_topk: int = 10, *, num_masks: Optional[int] = 32,
                 overlap_masks: bool = True, seg: float = 7.5, zero_ties: bool = True, **kwargs: Any) -> None:
        super().__init__(num_classes, strides, reg_max, box, cls, dfl, tal_topk, **kwargs)
        self.assigner = box_assigner(self.assigner, num_classes, self.strides, zero_ties)
        self.add_term("seg", "seg_term", seg, after="box")
        if num_masks is not None and (not isinstance(num_masks, int) or isinstance(num_masks, bool) or num_masks < 1):
            raise ValueError(f"num_masks: expected None or an int >= 1, got {num_masks!r}")
        self.num_masks = num_masks
        self.overlap_masks = bool(overlap_masks)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_masks={self.num_masks}, overlap_masks={self.overlap_masks}"

    # ------------------------------------------------------------------ checks
    def _check_proto(self, name: str, proto: object, bsz: int, channels: int, like: Tensor) -> Tensor:
        """A ``[B, channels, h, w]`` floating, finite tensor on ``like``'s device."""
        t = check_floating(name, proto)
        if t.ndim != 4 or t.shape[0] != bsz or t.shape[1] != channels:
            raise ValueError(f"{name}: expected shape [{bsz}, {channels if channels >= 0 else 'nm'}, h, w], got {tuple(t.shape)}")
        if t.device != like.device:
            raise TypeError(f"{name}: expected device {like.device} like feats[0], got {t.device}")
        if not bool(torch.isfinite(t.detach()).all()):
            raise ValueError(f"{name}: expected finite values, got NaN or inf")
        return t

    def _check_masks(self, masks: object, bsz: int, n_rows: int, image_hw: Tuple[float, float]) -> Tensor:
        t = check_tensor("masks", masks)
        lead = bsz if self.overlap_masks else n_rows
        what = "one instance-index map per image (overlap_masks)" if self.overlap_masks else "one mask per target row"
        if t.ndim != 3 or t.shape[0] != lead:
            raise ValueError(f"masks: expected shape [{lead}, Hm, Wm] ({what}), got {tuple(t.shape)}")
        h, w = image_hw
        if t.shape[1] * w != t.shape[2] * h:
            raise ValueError(
                f"masks: expected the image's aspect ratio {int(h)}:{int(w)} (Hm * W == Wm * H), got size "
                f"{tuple(t.shape[1:])}"
            )
        return t

    def check(self, feats: Sequence[Tensor], mask_coef: Sequence[Tensor], proto: Tensor, targets: Tensor,
              masks: Tensor) -> SegmentInputs:
        base = super().check(feats, targets)
        proto = check_floating("proto", proto)
        nm = self.num_masks if self.num_masks is not None else (proto.shape[1] if proto.ndim == 4 else -1)
        coef = flatten_level_maps("mask_coef", mask_coef, base.levels, nm, feats[0], base.dtype,
                                  f" (num_masks = {nm} coefficients)")
        return self.with_masks(base, coef, proto, masks)

    def with_masks(self, base: YOLOv8Inputs, coef: Tensor, proto: Tensor, masks: Tensor) -> SegmentInputs:
        """The detection inputs plus the mask coefficients ``coef [B, A, nm]`` (any strided view, in
        the compute dtype), the prototypes and the target masks."""
        proto = self._check_proto("proto", proto, base.batch_size, coef.shape[-1], coef).to(base.dtype)
        masks = self._check_masks(masks, base.batch_size, base.targets.shape[0], base.image_hw).to(base.device)
        slot, _ = image_slots(base.targets[:, 0].long().to(base.device), base.batch_size)
        return SegmentInputs(**vars(base), pred_coef=coef, proto=proto, masks=masks, row_slot=slot)

    def assignment(self, inputs: SegmentInputs, prepared: YOLOv8Decoding) -> Assignment:
        return aligned_assignment(self, inputs, prepared.pred_bboxes * prepared.stride_tensor)

    # ------------------------------------------------------------------ the mask term
    def seg_term(self, inputs: SegmentInputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """The box-cropped, area-normalized mask BCE, summed over the positives, over their number."""
        p = assignment.num_pos
        if not p:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        hm, wm = inputs.masks.shape[-2:]
        proto = inputs.proto
        if proto.shape[-2:] != (hm, wm):
            proto = TF.interpolate(proto, (hm, wm), mode="bilinear", align_corners=False)
        h, w = inputs.image_hw
        norm_boxes = assignment.boxes / assignment.boxes.new_tensor([w, h, w, h])
        boxes = norm_boxes * norm_boxes.new_tensor([wm, hm, wm, hm])
        area = (norm_boxes[:, 2] - norm_boxes[:, 0]) * (norm_boxes[:, 3] - norm_boxes[:, 1])
        b, a, rows = assignment.batch_index, assignment.pred_index, assignment.target_index
        if self.overlap_masks:  # the image's index map, equal to the target's index in its image + 1
            index, value = None, inputs.row_slot[rows] + 1
        else:
            index, value = rows, None
        loss = F.prototype_mask_bce(gather_rows(inputs.pred_coef, b, a), proto, inputs.masks, mask_index=index, mask_value=value,
                                    boxes=boxes, area=area, image=b, reduction="sum")
        return loss / p


class YOLO26SegmentLoss(YOLOv8SegmentLoss):
    """YOLO26 segmentation loss, equal to ultralytics 8.4 ``SegmentLoss26`` (module docstring): the
    assignment also scores each candidate's predicted mask
    (:class:`~detloss.assign.segment.SegTaskAlignedAssigner`), and the semantic term "sem" (gain
    ``sem``, 7.5 as the box gain) trains the head's semantic logits. Usually ``reg_max=1``.

    Call ``loss_fn(feats, mask_coef, proto, semantic, targets, masks, sem_masks)`` (the head's four
    outputs, then the targets): ``semantic`` ``[B, nc, hs, ws]`` logits, ``sem_masks`` ``[B, Hm, Wm]``
    the class of each pixel (the size of ``masks``; pixels no instance covers are ignored). Components "box", "seg", "cls", "dfl" /
    "l1", "sem".
    """

    name = "yolo26-seg"

    def __init__(self, num_classes: int, strides: Sequence[float] = (8, 16, 32), reg_max: int = 1, box: float = 7.5,
                 cls: float = 0.5, dfl: float = 1.5, tal_topk: int = 10, *, sem: float = 7.5, **kwargs: Any) -> None:
        super().__init__(num_classes, strides, reg_max, box, cls, dfl, tal_topk, **kwargs)
        self.add_term("sem", "sem_term", sem)
        self.assigner = box_assigner(self.assigner, num_classes, self.strides, self.assigner.zero_ties, SegTaskAlignedAssigner)

    def check(self, feats: Sequence[Tensor], mask_coef: Sequence[Tensor], proto: Tensor, semantic: Tensor,
              targets: Tensor, masks: Tensor, sem_masks: Tensor) -> SegmentInputs:
        return self.with_semantic(super().check(feats, mask_coef, proto, targets, masks), semantic, sem_masks)

    def with_semantic(self, inputs: SegmentInputs, semantic: Tensor, sem_masks: Tensor) -> SegmentInputs:
        """The segmentation inputs plus the semantic logits and the class maps."""
        semantic = self._check_proto("semantic", semantic, inputs.batch_size, self.num_classes, inputs.pred_coef)
        sem = check_tensor("sem_masks", sem_masks)
        if tuple(sem.shape) != (inputs.batch_size, *inputs.masks.shape[-2:]):
            raise ValueError(
                f"sem_masks: expected shape {(inputs.batch_size, *inputs.masks.shape[-2:])} (one class map per image, "
                f"the size of masks), got {tuple(sem.shape)}"
            )
        classes = sem.detach().long()
        if sem.numel() and bool(((classes < 0) | (classes >= self.num_classes)).any()):
            raise ValueError(f"sem_masks: expected class ids in [0, {self.num_classes - 1}], got {sem.min().item():g}..{sem.max().item():g}")
        return replace(inputs, semantic=semantic.to(inputs.dtype), sem_masks=classes.to(inputs.device))

    def instance_masks_for_assigner(self, inputs: SegmentInputs) -> Tensor:
        """bool ``[B, M, h, w]``: each padded target slot's mask at the prototypes' size (nearest)."""
        mh, mw = inputs.proto.shape[-2:]
        masks = inputs.masks
        if masks.shape[-2:] != (mh, mw):
            masks = TF.interpolate(masks[None].float(), (mh, mw), mode="nearest")[0] if masks.numel() else masks.new_zeros((masks.shape[0], mh, mw))
        m = inputs.gt_rows.shape[1]
        if self.overlap_masks:
            return masks[:, None] == torch.arange(1, m + 1, device=masks.device)[:, None, None]
        out = torch.zeros((inputs.batch_size, m, mh, mw), dtype=torch.bool, device=masks.device)
        valid = inputs.gt_rows >= 0
        out[valid] = masks[inputs.gt_rows[valid]] > 0.5
        return out

    def assignment(self, inputs: SegmentInputs, prepared: YOLOv8Decoding) -> Assignment:
        with torch.no_grad():
            gt_masks = self.instance_masks_for_assigner(inputs)
        return aligned_assignment(self, inputs, prepared.pred_bboxes * prepared.stride_tensor,
                                  pd_coef=inputs.pred_coef.detach(), proto=inputs.proto.detach(), gt_masks=gt_masks,
                                  mask_scale=inputs.proto.shape[-2] / inputs.image_hw[0])

    def sem_term(self, inputs: SegmentInputs, prepared: YOLOv8Decoding, assignment: Assignment) -> Tensor:
        """BCE + Dice (0.5 each) of the semantic logits against the covered pixels' one-hot classes."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        masks = inputs.masks
        if self.overlap_masks:
            present = masks != 0
        else:
            cover = torch.zeros((inputs.batch_size, *masks.shape[-2:]), dtype=inputs.dtype, device=masks.device)
            cover.index_add_(0, inputs.targets[:, 0].long().to(masks.device), masks.to(inputs.dtype))
            present = cover != 0
        target = torch.zeros((inputs.batch_size, self.num_classes, *masks.shape[-2:]), dtype=inputs.dtype, device=masks.device)
        target.scatter_(1, inputs.sem_masks[:, None], present[:, None].to(inputs.dtype))
        if target.shape[-2:] != inputs.semantic.shape[-2:]:
            target = TF.interpolate(target, inputs.semantic.shape[-2:], mode="nearest")
        return F.bce_dice_loss(inputs.semantic, target)
