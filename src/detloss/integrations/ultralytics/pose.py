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
from ...losses.pose import PoseInputs, YOLO26PoseLoss, YOLOv8PoseLoss
from ._heads import anchor_major
from ._model import ModelInfo, UltralyticsCriterion, batch_tensor, hyp
from ._swap import register_criterion
from .detect import UltralyticsDetectBranch

__all__ = ["PoseLoss", "oks_sigmas", "UltralyticsPoseBranch", "UltralyticsPose26Branch"]


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


def _pose_inputs(branch: Any, preds: Mapping[str, Any], batch: Mapping[str, Any], with_sigma: bool) -> PoseInputs:
    base = UltralyticsDetectBranch.check(branch, preds, batch)
    k, d = branch.kpt_shape
    kpts = anchor_major(preds, "kpts", k * d, f"K * D = {k} * {d}", base)
    sigma = anchor_major(preds, "kpts_sigma", 2 * k, f"2 * K = 2 * {k}", base) if with_sigma else None
    return branch.with_keypoints(base, kpts, batch_tensor(batch, "keypoints"), sigma)


class UltralyticsPoseBranch(UltralyticsDetectBranch, YOLOv8PoseLoss):
    """:class:`~detloss.losses.pose.YOLOv8PoseLoss` on one head's outputs as ultralytics emits them
    and the dataloader's batch (``branch(preds, batch)``)."""

    def check(self, preds: Mapping[str, Any], batch: Mapping[str, Any]) -> PoseInputs:  # type: ignore[override]
        return _pose_inputs(self, preds, batch, with_sigma=False)


class UltralyticsPose26Branch(UltralyticsDetectBranch, YOLO26PoseLoss):
    """:class:`~detloss.losses.pose.YOLO26PoseLoss` on one head's outputs as ultralytics emits them
    (``kpts_sigma`` read only with a flow model) and the dataloader's batch."""

    def check(self, preds: Mapping[str, Any], batch: Mapping[str, Any]) -> PoseInputs:  # type: ignore[override]
        return _pose_inputs(self, preds, batch, with_sigma=self.flow_model is not None)


@register_criterion("PoseModel")
class PoseLoss(UltralyticsCriterion):
    """``loss, items = PoseLoss(model)(preds, batch)``: ultralytics' ``v8PoseLoss`` / ``PoseLoss26``
    (items box_loss, pose_loss, kobj_loss, cls_loss, dfl_loss | l1_loss[, rle_loss]), end-to-end
    for heads with a one-to-one branch (see :class:`~detloss.integrations.ultralytics.UltralyticsCriterion`)."""

    def make_branch(self, model: Any, info: ModelInfo, tal_topk: int, tal_topk2: Optional[int]) -> torch.nn.Module:
        head, args = info.head, model.args
        kpt_shape = head.kpt_shape
        kw = dict(box=hyp(args, "box"), cls=hyp(args, "cls"), dfl=hyp(args, "dfl"), tal_topk=tal_topk, tal_topk2=tal_topk2,
                  kpt_shape=tuple(int(v) for v in kpt_shape), pose=hyp(args, "pose"), kobj=hyp(args, "kobj"),
                  sigmas=oks_sigmas(model, kpt_shape))
        if not info.head_is("Pose26"):
            return UltralyticsPoseBranch(info, **kw).to(info.device)
        flow = head.flow_model if hasattr(head, "flow_model") else None
        if flow is not None:
            k = int(kpt_shape[0])
            kw.update(flow_model=flow, rle=hyp(args, "rle"),
                      rle_weights=COCO_RLE_WEIGHTS.clone() if kpt_shape == [17, 3] else torch.ones(k))
        return UltralyticsPose26Branch(info, **kw).to(info.device)
