"""Drop-in for ultralytics 8.4's segmentation criteria: :class:`SegmentationLoss`
(``v8SegmentationLoss``; ``SegmentLoss26`` for ``Segment26`` heads; ``E2ELoss(...)`` of them for
heads with a one-to-one branch), computed by :class:`detloss.losses.segment.YOLOv8SegmentLoss` /
:class:`~detloss.losses.segment.YOLO26SegmentLoss`.

It reads what those read (see :mod:`._model`): the common fields and ``model.args.overlap_mask``
(the number of mask coefficients comes from the prototypes, as in ultralytics). Both mask terms
take ultralytics' box gain. ``preds``: ``boxes``, ``scores``, ``feats``, ``mask_coefficient (B, nm,
A)``, ``proto (B, nm, h, w)`` or, from ``Segment26`` heads, the tuple ``(prototypes, semantic
logits (B, nc, hs, ws))``; ``batch``: ``batch_idx``, ``cls``, ``bboxes``, ``masks`` and, for
``Segment26``, ``sem_masks``. ultralytics' items always include ``sem_loss`` (0 for
``v8SegmentationLoss``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ...losses.segment import SegmentInputs, YOLO26SegmentLoss, YOLOv8SegmentLoss
from ._heads import anchor_major
from ._model import ModelInfo, UltralyticsCriterion, batch_tensor, hyp
from ._swap import register_criterion
from .detect import UltralyticsDetectBranch

__all__ = ["SegmentationLoss", "UltralyticsSegmentBranch", "UltralyticsSegment26Branch"]


def _protos(preds: Mapping[str, Any], semantic: bool) -> Tuple[Any, Optional[Any]]:
    """``preds['proto']``: the prototypes, or (prototypes, semantic logits) from a Segment26 head."""
    if "proto" not in preds:
        raise ValueError(f"preds: expected a 'proto' entry (the prototypes), got keys {sorted(preds)}")
    proto = preds["proto"]
    if isinstance(proto, tuple) != semantic or (semantic and len(proto) != 2):
        want = "(prototypes, semantic logits) from a Segment26 head" if semantic else "the prototypes alone (a Segment head)"
        raise ValueError(f"preds['proto']: expected {want}, got {'a tuple' if isinstance(proto, tuple) else 'a tensor'}")
    return proto if semantic else (proto, None)


def _segment_inputs(branch: Any, preds: Mapping[str, Any], batch: Mapping[str, Any], semantic: bool) -> SegmentInputs:
    base = UltralyticsDetectBranch.check(branch, preds, batch)
    proto, sem_logits = _protos(preds, semantic)
    nm = proto.shape[1] if isinstance(proto, Tensor) and proto.ndim == 4 else -1
    coef = anchor_major(preds, "mask_coefficient", nm, "the prototypes' nm", base)
    out = branch.with_masks(base, coef, proto, batch_tensor(batch, "masks"))
    return branch.with_semantic(out, sem_logits, batch_tensor(batch, "sem_masks")) if semantic else out


class UltralyticsSegmentBranch(UltralyticsDetectBranch, YOLOv8SegmentLoss):
    """:class:`~detloss.losses.segment.YOLOv8SegmentLoss` on one head's outputs as ultralytics
    emits them and the dataloader's batch, with ultralytics' constant ``sem`` item (0)."""

    def __init__(self, info: ModelInfo, **kwargs: Any) -> None:
        super().__init__(info, **kwargs)
        self.add_term("sem", "zero_term", 0.0)

    def check(self, preds: Mapping[str, Any], batch: Mapping[str, Any]) -> SegmentInputs:  # type: ignore[override]
        return _segment_inputs(self, preds, batch, semantic=False)

    def zero_term(self, inputs: SegmentInputs, prepared: Any, assignment: Any) -> Tensor:
        """v8SegmentationLoss's ``sem_loss``: always 0 for a head without semantic logits."""
        return torch.zeros((), dtype=inputs.dtype, device=inputs.device)


class UltralyticsSegment26Branch(UltralyticsDetectBranch, YOLO26SegmentLoss):
    """:class:`~detloss.losses.segment.YOLO26SegmentLoss` on one head's outputs as ultralytics emits
    them and the dataloader's batch."""

    def check(self, preds: Mapping[str, Any], batch: Mapping[str, Any]) -> SegmentInputs:  # type: ignore[override]
        return _segment_inputs(self, preds, batch, semantic=True)


@register_criterion("SegmentationModel")
class SegmentationLoss(UltralyticsCriterion):
    """``loss, items = SegmentationLoss(model)(preds, batch)``: ultralytics' ``v8SegmentationLoss``
    / ``SegmentLoss26`` (items box_loss, seg_loss, cls_loss, dfl_loss | l1_loss, sem_loss),
    end-to-end for heads with a one-to-one branch (see
    :class:`~detloss.integrations.ultralytics.UltralyticsCriterion`)."""

    def make_branch(self, model: Any, info: ModelInfo, tal_topk: int, tal_topk2: Optional[int]) -> torch.nn.Module:
        args = model.args
        box = hyp(args, "box")
        kw = dict(box=box, cls=hyp(args, "cls"), dfl=hyp(args, "dfl"), tal_topk=tal_topk, tal_topk2=tal_topk2,
                  num_masks=None, overlap_masks=bool(args.overlap_mask), seg=box)
        if info.head_is("Segment26"):
            return UltralyticsSegment26Branch(info, sem=box, **kw).to(info.device)
        return UltralyticsSegmentBranch(info, **kw).to(info.device)
