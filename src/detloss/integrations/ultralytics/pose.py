"""Drop-in for ultralytics 8.4's pose criteria: :class:`PoseLoss` (``v8PoseLoss``; ``PoseLoss26``
for ``Pose26`` heads; ``E2ELoss(...)`` of them for heads with a one-to-one branch), computed by
:class:`detloss.losses.pose.YOLOv8PoseLoss` / :class:`~detloss.losses.pose.YOLO26PoseLoss`.

It reads what those read (see :mod:`._model`): the common fields, ``model.args.pose`` and
``.kobj``, ``model.model[-1].kpt_shape`` (a list), ``getattr(model, "kpt_oks_sigmas", None)``;
for ``Pose26`` heads ``model.model[-1].flow_model`` (if it has one) and, when that is not None,
``model.args.rle``. The OKS sigmas follow ultralytics' rule: ``kpt_oks_sigmas`` if set (K positive
values), else COCO's when ``kpt_shape == [17, 3]`` (a list compare, as ultralytics makes it),
else ``1 / K``. The RLE term is evaluated through the head's flow model (its ``log_prob``), so its
parameters get their gradients as in ultralytics.

``preds``: ``boxes``, ``scores``, ``feats``, ``kpts (B, K * D, A)`` and, for ``Pose26`` heads with a
flow, ``kpts_sigma (B, 2 K, A)``; ``batch``: ``batch_idx``, ``cls``, ``bboxes``, ``keypoints (N, K, D)``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ...functional.keypoints import COCO_KEYPOINT_SIGMAS, COCO_RLE_WEIGHTS
from ...losses.pose import YOLO26PoseLoss, YOLOv8PoseLoss
from ...output import LossOutput
from ._heads import box_class_maps, level_maps, pred_tensor
from ._model import ModelInfo, UltralyticsCriterion, batch_rows, batch_tensor, hyp, levels_of
from ._swap import register_criterion
from .obb import common_kwargs

__all__ = ["PoseLoss", "oks_sigmas"]


def oks_sigmas(model: Any, kpt_shape: Any) -> torch.Tensor:
    """ultralytics' OKS sigmas for a pose model (module docstring), float32 ``[K]``."""
    k = int(kpt_shape[0])
    sigmas = getattr(model, "kpt_oks_sigmas", None)
    if sigmas is None:
        return COCO_KEYPOINT_SIGMAS.clone() if kpt_shape == [17, 3] else torch.ones(k) / k
    s = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
    if s.numel() != k or not bool((s > 0).all()):
        raise ValueError(f"model.kpt_oks_sigmas: expected {k} positive values (one per keypoint), got {s.tolist()}")
    return s


class PoseBranch(torch.nn.Module):
    """One head's pose loss on ultralytics' outputs (a :class:`YOLOv8PoseLoss` fed per level)."""

    def __init__(self, loss: YOLOv8PoseLoss, info: ModelInfo) -> None:
        super().__init__()
        self.loss, self.info = loss, info

    def forward(self, preds: Mapping[str, Any], batch: Mapping[str, Any]) -> LossOutput:
        levels = levels_of(preds.get("feats"), self.info.strides)
        feats = box_class_maps(preds, levels, self.info.reg_max, self.info.num_classes)
        k, d = self.loss.kpt_shape
        kpts = level_maps("preds['kpts']", pred_tensor(preds, "kpts", k * d, f" = K * D {k} * {d}"), levels)
        rows = batch_rows(batch, feats[0].device)
        keypoints = batch_tensor(batch, "keypoints").to(feats[0].device)
        if not isinstance(self.loss, YOLO26PoseLoss):
            return self.loss(feats, kpts, rows, keypoints)
        sigma = None
        if self.loss.flow_model is not None:
            sigma = level_maps("preds['kpts_sigma']", pred_tensor(preds, "kpts_sigma", 2 * k, f" = 2 * K {k}"), levels)
        return self.loss(feats, kpts, sigma, rows, keypoints)


@register_criterion("PoseModel")
class PoseLoss(UltralyticsCriterion):
    """``loss, items = PoseLoss(model)(preds, batch)``: ultralytics' ``v8PoseLoss`` / ``PoseLoss26``
    (items box_loss, pose_loss, kobj_loss, cls_loss, dfl_loss | l1_loss[, rle_loss]), end-to-end
    for heads with a one-to-one branch (see :class:`~detloss.integrations.ultralytics.UltralyticsCriterion`)."""

    def make_branch(self, model: Any, info: ModelInfo, tal_topk: int, tal_topk2: Optional[int]) -> torch.nn.Module:
        head, args = info.head, model.args
        kpt_shape = head.kpt_shape
        kw = dict(tal_topk=tal_topk, tal_topk2=tal_topk2, kpt_shape=tuple(int(v) for v in kpt_shape),
                  pose=hyp(args, "pose"), kobj=hyp(args, "kobj"), sigmas=oks_sigmas(model, kpt_shape),
                  **common_kwargs(model, info))
        if info.head_is("Pose26"):
            flow = head.flow_model if hasattr(head, "flow_model") else None
            if flow is not None:
                k = int(kpt_shape[0])
                kw.update(flow_model=flow, rle=hyp(args, "rle"),
                          rle_weights=COCO_RLE_WEIGHTS.clone() if kpt_shape == [17, 3] else torch.ones(k))
            loss: YOLOv8PoseLoss = YOLO26PoseLoss(info.num_classes, info.strides, info.reg_max, **kw)
        else:
            loss = YOLOv8PoseLoss(info.num_classes, info.strides, info.reg_max, **kw)
        return PoseBranch(loss.to(info.device), info)
