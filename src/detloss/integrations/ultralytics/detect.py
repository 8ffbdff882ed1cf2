"""The detection criteria: ``DetectionLoss(model)`` (ultralytics ``v8DetectionLoss``, or
``E2ELoss(v8DetectionLoss)`` for a head with a one-to-one branch: YOLOv10, YOLO26) and
``E2EDetectLoss(model)`` (the legacy YOLOv10 criterion), computed by
:class:`detloss.YOLOv8Loss` (reg_max 16 DFL or reg_max 1 L1, class weights) and
:class:`detloss.losses.e2e.EndToEndLoss`.

Source: ultralytics 8.4 ``ultralytics/utils/loss.py`` (``v8DetectionLoss``, ``E2ELoss``,
``E2EDetectLoss``) and ``nn/tasks.py`` (``DetectionModel.init_criterion``).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
from torch import Tensor

from ..._checks import compute_dtype, upcast
from ...boxes import check_yolo_targets
from ...losses.yolov8 import YOLOv8Inputs, YOLOv8Loss, _padded_targets
from ._model import ModelInfo, UltralyticsCriterion, batch_rows, hyp, levels_of
from ._swap import register_criterion

__all__ = ["DetectionLoss", "E2EDetectLoss", "UltralyticsDetectBranch"]


def _head_output(preds: Mapping[str, Any], key: str, channels: int, what: str) -> Tensor:
    if key not in preds:
        raise ValueError(f"preds: expected a {key!r} entry (the head's {what}), got keys {sorted(preds)}")
    t = preds[key]
    if not isinstance(t, Tensor) or not t.is_floating_point():
        raise TypeError(f"preds[{key!r}]: expected a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if t.ndim != 3 or t.shape[1] != channels:
        raise ValueError(f"preds[{key!r}]: expected shape [B, {channels} ({what}), A], got {tuple(t.shape)}")
    return t


class UltralyticsDetectBranch(YOLOv8Loss):
    """:class:`~detloss.YOLOv8Loss` called with one head's outputs as ultralytics' head emits them
    and the dataloader's batch: ``branch(preds, batch)``.

    ``preds``: ``boxes [B, 4 * reg_max, A]`` (DFL logits side-major, or ltrb distances in grid
    units for reg_max 1), ``scores [B, nc, A]`` logits, ``feats`` (the per-level maps; only their
    shapes are read). ``batch``: ``batch_idx``, ``cls``, ``bboxes`` (normalized xywh). Only the
    :meth:`check` step differs from YOLOv8Loss (and the graph of an empty box term, see
    :meth:`box_term`): no per-level concatenation (the head has already flattened its levels),
    targets on the model's device, and no finiteness check, so a diverged model's NaN reaches the
    loss (ultralytics' trainer recovers from a NaN loss).
    """

    def __init__(self, info: ModelInfo, **kwargs: Any) -> None:
        super().__init__(info.num_classes, strides=info.strides, reg_max=info.reg_max,
                         class_weights=info.class_weights, **kwargs)
        self.target_device = info.device

    def check(self, preds: Mapping[str, Any], batch: Mapping[str, Any]) -> YOLOv8Inputs:  # type: ignore[override]
        if not isinstance(preds, Mapping):
            raise TypeError(f"preds: expected the head's outputs dict, got {type(preds).__name__}")
        boxes = _head_output(preds, "boxes", 4 * self.reg_max, f"4 * reg_max {self.reg_max}")
        scores = _head_output(preds, "scores", self.num_classes, f"nc {self.num_classes}")
        levels = levels_of(preds.get("feats"), self.strides)
        n_anchor = sum(h * w for h, w, _ in levels)
        for key, t in (("boxes", boxes), ("scores", scores)):
            if t.shape[0] != boxes.shape[0] or t.shape[2] != n_anchor:
                raise ValueError(
                    f"preds[{key!r}]: expected [{boxes.shape[0]}, {t.shape[1]}, {n_anchor}] (A = the feats' "
                    f"{[(h, w) for h, w, _ in levels]} points), got {tuple(t.shape)}"
                )
        if scores.device != boxes.device:
            raise ValueError(f"preds['scores']: expected device {boxes.device} as preds['boxes'], got {scores.device}")
        bsz, dt, dev = boxes.shape[0], compute_dtype(boxes, scores), boxes.device
        targets = check_yolo_targets(
            batch_rows(batch, self.target_device), num_classes=self.num_classes, batch_size=bsz, name="batch"
        )
        image_hw = (levels[0][0] * self.strides[0], levels[0][1] * self.strides[0])
        gt_labels, gt_bboxes, mask_gt, gt_rows = _padded_targets(targets.to(dev), bsz, image_hw, dt)
        return YOLOv8Inputs(
            levels, bsz, dt, dev, image_hw,
            upcast(boxes, dt).permute(0, 2, 1), upcast(scores, dt).permute(0, 2, 1),
            targets, gt_labels, gt_bboxes, mask_gt, gt_rows,
        )

    def box_term(self, inputs: YOLOv8Inputs, prepared: Any, assignment: Any) -> Tensor:
        """YOLOv8Loss's, kept connected to the box channels when nothing is assigned (an empty
        slice: zero gradient), as ultralytics does: the optimizer then still steps the box head's
        weights (momentum, weight decay) on a batch without targets, as in ultralytics' run."""
        term = super().box_term(inputs, prepared, assignment)
        return term if assignment.num_pos else term + inputs.pred_dist[..., :0].sum()


@register_criterion("DetectionModel")
class DetectionLoss(UltralyticsCriterion):
    """Drop-in for ultralytics' detection criterion: ``loss, items = DetectionLoss(model)(preds, batch)``.

    Picks its form as ``DetectionModel.init_criterion`` does: ``E2ELoss(v8DetectionLoss)`` (one-to-many
    top-k 10 and one-to-one top-k 7 then 1, weights 0.8 / 0.2 moving to 0.1 / 0.9 through
    :meth:`update`, the one-to-one items) when the head has a non-None ``one2one_cv2`` (YOLOv10's
    v10Detect, YOLO26), else ``v8DetectionLoss``. Items ``box_loss``, ``cls_loss``, ``dfl_loss``
    (``l1_loss`` for reg_max 1). Reads the model as described in :mod:`._model`: gains
    ``model.args.box / cls / dfl`` (once, here), ``model.args.epochs`` in :meth:`update` only.
    """

    def make_branch(self, model: Any, info: ModelInfo, tal_topk: int, tal_topk2: Optional[int]) -> torch.nn.Module:
        return UltralyticsDetectBranch(
            info, box=hyp(self.args, "box"), cls=hyp(self.args, "cls"), dfl=hyp(self.args, "dfl"),
            tal_topk=tal_topk, tal_topk2=tal_topk2,
        )


class E2EDetectLoss(DetectionLoss):
    """Drop-in for ultralytics' legacy ``E2EDetectLoss`` (YOLOv10 checkpoints): one-to-many top-k 10
    plus one-to-one top-k 1, both with weight 1, items summed key by key; no schedule. Always this
    form, whatever the head (ultralytics builds it directly, never through ``init_criterion``)."""

    fixed_form = "e2e_sum"
