r"""Pose losses: YOLOv8-pose / YOLO11-pose (ultralytics ``v8PoseLoss``) and YOLO26-pose
(``PoseLoss26``, with the RLE term of its flow model).

Source: ultralytics 8.4 ``ultralytics/utils/loss.py`` (``v8PoseLoss``, ``PoseLoss26``,
``KeypointLoss``, ``RLELoss``), ``utils/tal.py`` (``PoseTaskAlignedAssigner``),
``utils/metrics.py`` (``OKS_SIGMA``, ``RLE_WEIGHT``), ``nn/modules/block.py`` (``RealNVP``);
YOLO-Pose (Maji et al. 2022, arXiv:2204.06806), RLE (Li et al. 2021, arXiv:2107.11291).

The detection terms are those of :class:`~detloss.losses.yolov8.YOLOv8Loss` (box, cls, dfl or
l1). Per positive anchor ``a`` (``P`` of them, not weighted by the target scores), with its
target's ``K`` keypoints in grid units, visibility ``v`` (any non-zero flag; all visible for
2-D keypoints), the target box area ``A`` in grid units squared and the predicted keypoints
decoded from the head's raw ``(x, y)``: YOLOv8 ``2 (x, y) + anchor - 0.5``, YOLO26 ``(x, y) + anchor``::

    pose = mean_{a, k} K / (V_a + 1e-9) * (1 - exp(-d_ak / ((2 sigma_k)^2 (A_a + 1e-9) 2))) * v_ak
    kobj = mean_{a, k} BCEWithLogits(visibility logit_ak, v_ak)          (heads with 3-D keypoints)
    rle  = max(RLE(visible keypoints; the flow's log-density), 0)        (YOLO26 with a flow model)
    total = (box, pose, kobj, cls, dfl[, rle] times their gains, summed) * batch_size

``sigma`` = COCO's 17 OKS constants for ``kpt_shape = (17, 3)``, else ``1 / K`` each (or the
given ones). YOLO26 assigns with keypoint OKS and a pyramid-level gate
(:class:`~detloss.assign.pose.PoseTaskAlignedAssigner`) and decodes without the ``2x - 0.5``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import functional as F
from .._checks import check_floating
from ..assign.base import Assignment
from ..assign.pose import PoseTaskAlignedAssigner
from ..functional.keypoints import COCO_KEYPOINT_SIGMAS, COCO_RLE_WEIGHTS
from ._rows import gather_rows
from .tasks import aligned_assignment, box_assigner, flatten_level_maps
from .yolov8 import YOLOv8Decoding, YOLOv8Inputs, YOLOv8Loss

__all__ = ["YOLOv8PoseLoss", "YOLO26PoseLoss", "PoseInputs", "PoseDecoding", "default_sigmas"]


def default_sigmas(kpt_shape: Tuple[int, int]) -> Tensor:
    """ultralytics' OKS sigmas: COCO's for ``(17, 3)`` keypoints, else ``1 / K`` each (float32)."""
    k = kpt_shape[0]
    return COCO_KEYPOINT_SIGMAS.clone() if tuple(kpt_shape) == (17, 3) else torch.ones(k) / k


def _check_kpt_shape(kpt_shape: object) -> Tuple[int, int]:
    try:
        k, d = (int(v) for v in kpt_shape)  # type: ignore[union-attr]
    except Exception:
        raise ValueError(f"kpt_shape: expected (keypoints, 2 or 3), got {kpt_shape!r}") from None
    if k < 1 or d not in (2, 3):
        raise ValueError(f"kpt_shape: expected (keypoints >= 1, 2 or 3), got {kpt_shape!r}")
    return k, d


@dataclass
class PoseInputs(YOLOv8Inputs):
    """:class:`~detloss.losses.yolov8.YOLOv8Inputs` plus the raw keypoint outputs ``pred_kpts
    [B, A, K, D]``, the target ``keypoints [N, K, 3]`` (x, y in pixels, visibility; rows as
    ``targets``) and, for YOLO26 with a flow, the sigma logits ``pred_sigma [B, A, K, 2]``."""

    pred_kpts: Optional[Tensor] = None
    keypoints: Optional[Tensor] = None
    pred_sigma: Optional[Tensor] = None


@dataclass
class PoseDecoding(YOLOv8Decoding):
    """:class:`~detloss.losses.yolov8.YOLOv8Decoding` plus, after ``gather``, the positives'
    decoded keypoints ``pos_pred_kpts [P, K, D]`` and their targets ``pos_target_kpts [P, K, 3]``
    (grid units, visibility last)."""

    pos_pred_kpts: Optional[Tensor] = None
    pos_target_kpts: Optional[Tensor] = None


class YOLOv8PoseLoss(YOLOv8Loss):
    """Pose loss equal to ultralytics 8.4 ``v8PoseLoss`` (formula and source in the module
    docstring); the arguments of :class:`~detloss.losses.yolov8.YOLOv8Loss`, plus (keyword-only,
    ultralytics' defaults):

        kpt_shape: ``(K, D)`` keypoints per object and their dimensions (2: x, y; 3: x, y,
            visibility) (``(17, 3)``, COCO).
        pose, kobj: gains of the keypoint and keypoint-visibility terms (12.0, 1.0).
        sigmas: ``[K]`` OKS constants (None: :func:`default_sigmas`).
        zero_ties: the reference's zero-alignment positives (True; see :mod:`detloss.assign.aligned`:
            they count in the keypoint terms' means).

    Call ``loss_fn(feats, kpts, targets, keypoints)``: ``feats`` as for YOLOv8Loss, ``kpts`` per
    level ``[B, K * D, H, W]`` (channel ``k * D + d``), ``targets`` rows ``[N, 6]`` and
    ``keypoints [N, K, 2 or 3]``, the targets' keypoints normalized to 0..1 (x, y[, visibility
    0/1/2]). Components "box", "pose", "kobj", "cls", "dfl" (or "l1").
    """

    name = "yolov8-pose"

    def __init__(
        self,
        num_classes: int = 1,
        strides: Sequence[float] = (8, 16, 32),
        reg_max: int = 16,
        box: float = 7.5,
        cls: float = 0.5,
        dfl: float = 1.5,
        tal_topk: int = 10,
        *,
        kpt_shape: Tuple[int, int] = (17, 3),
        pose: float = 12.0,
        kobj: float = 1.0,
        sigmas: Optional[Tensor] = None,
        zero_ties: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, strides, reg_max, box, cls, dfl, tal_topk, **kwargs)
        self.assigner = box_assigner(self.assigner, num_classes, self.strides, zero_ties)
        self.add_term("pose", "pose_term", pose, after="box")
        self.add_term("kobj", "kobj_term", kobj, after="pose")
        self.kpt_shape = _check_kpt_shape(kpt_shape)
        k = self.kpt_shape[0]
        sig = default_sigmas(self.kpt_shape) if sigmas is None else check_floating("sigmas", torch.as_tensor(sigmas))
        if tuple(sig.shape) != (k,) or not bool((sig > 0).all()):
            raise ValueError(f"sigmas: expected {k} positive values (one per keypoint), got {sig.tolist()}")
        self.register_buffer("sigmas", sig.detach().clone(), persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", kpt_shape={self.kpt_shape}"

    # ------------------------------------------------------------------ checks
    def _check_keypoints(self, keypoints: object, n_rows: int) -> Tensor:
        t = check_floating("keypoints", keypoints)
        k = self.kpt_shape[0]
        if t.ndim != 3 or t.shape[0] != n_rows or t.shape[1] != k or t.shape[2] not in (2, 3):
            raise ValueError(
                f"keypoints: expected shape [{n_rows}, {k}, 2 or 3] (one row per target, x, y[, visibility]), "
                f"got {tuple(t.shape)}"
            )
        if not bool(torch.isfinite(t).all()):
            raise ValueError("keypoints: expected finite values, got NaN or inf")
        return t

    def check(self, feats: Sequence[Tensor], kpts: Sequence[Tensor], targets: Tensor, keypoints: Tensor,
              kpts_sigma: Optional[Sequence[Tensor]] = None) -> PoseInputs:
        base = super().check(feats, targets)
        k, d = self.kpt_shape
        flat = flatten_level_maps("kpts", kpts, base.levels, k * d, feats[0], base.dtype,
                                  f" (K * D = {k} * {d} keypoint channels)")
        sigma = None
        if kpts_sigma is not None:
            sigma = flatten_level_maps("kpts_sigma", kpts_sigma, base.levels, 2 * k, feats[0], base.dtype,
                                       f" (2 * K = 2 * {k} sigma channels)")
        return self.with_keypoints(base, flat, keypoints, sigma)

    def with_keypoints(self, base: YOLOv8Inputs, kpts: Tensor, keypoints: Tensor, kpts_sigma: Optional[Tensor] = None) -> PoseInputs:
        """The detection inputs plus the keypoint outputs ``kpts [B, A, K * D]`` (and ``kpts_sigma
        [B, A, 2 K]``; any strided view, in the compute dtype) and the target ``keypoints``."""
        k, d = self.kpt_shape
        kp = self._check_keypoints(keypoints, base.targets.shape[0]).to(device=base.device, dtype=base.dtype)
        if kp.shape[2] == 2:  # no visibility: every keypoint counts
            kp = torch.cat((kp, torch.ones_like(kp[..., :1])), -1)
        h, w = base.image_hw
        kp = torch.cat((kp[..., :2] * kp.new_tensor([w, h]), kp[..., 2:]), -1)
        sigma = None if kpts_sigma is None else kpts_sigma.unflatten(-1, (k, 2))
        return PoseInputs(**vars(base), pred_kpts=kpts.unflatten(-1, (k, d)), keypoints=kp, pred_sigma=sigma)

    # ------------------------------------------------------------------ the steps
    def assignment(self, inputs: PoseInputs, prepared: PoseDecoding) -> Assignment:
        return aligned_assignment(self, inputs, prepared.pred_bboxes * prepared.stride_tensor)

    def decode_keypoints(self, pred_kpts: Tensor, anchor_points: Tensor) -> Tensor:
        """Keypoints in grid units from the raw outputs ``[..., K, D]`` at ``anchor_points``
        ``[..., 2]``: ``2 (x, y) + anchor - 0.5``; further channels unchanged."""
        xy = pred_kpts[..., :2] * 2.0 + (anchor_points[..., None, :] - 0.5)
        return torch.cat((xy, pred_kpts[..., 2:]), -1)

    def _positive_keypoints(self, inputs: PoseInputs, prepared: PoseDecoding, assignment: Assignment) -> Tuple[Tensor, Tensor]:
        """Decoded predicted keypoints ``[P, K, D]`` and target keypoints ``[P, K, 3]`` (grid units) of the positives."""
        b, a = assignment.batch_index, assignment.pred_index
        pred = self.decode_keypoints(gather_rows(inputs.pred_kpts, b, a), prepared.pos_anchor_points)
        gt = inputs.keypoints[assignment.target_index]
        gt = torch.cat((gt[..., :2] / prepared.pos_strides[:, :, None], gt[..., 2:]), -1)
        return pred, gt

    def prepare(self, inputs: PoseInputs) -> PoseDecoding:
        return PoseDecoding(**vars(super().prepare(inputs)))

    def gather(self, inputs: PoseInputs, prepared: PoseDecoding, assignment: Assignment) -> PoseDecoding:
        out = super().gather(inputs, prepared, assignment)
        pred, gt = self._positive_keypoints(inputs, out, assignment)
        return replace(out, pos_pred_kpts=pred, pos_target_kpts=gt)

    # ------------------------------------------------------------------ the terms
    def pose_term(self, inputs: PoseInputs, prepared: PoseDecoding, assignment: Assignment) -> Tensor:
        """The OKS keypoint loss of the positives (mean over positives and keypoints)."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        pred, gt = prepared.pos_pred_kpts, prepared.pos_target_kpts
        wh = prepared.pos_target_bboxes[:, 2:] - prepared.pos_target_bboxes[:, :2]
        return F.keypoint_loss(pred[..., :2], gt[..., :2], visible=gt[..., 2] != 0, area=wh[:, 0] * wh[:, 1],
                               sigmas=self.sigmas)

    def kobj_term(self, inputs: PoseInputs, prepared: PoseDecoding, assignment: Assignment) -> Tensor:
        """BCE of the visibility logits against the targets' visibility (3-D keypoints only)."""
        if not assignment.num_pos or self.kpt_shape[1] != 3:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        pred, gt = prepared.pos_pred_kpts, prepared.pos_target_kpts
        return F.bce_with_logits(pred[..., 2], (gt[..., 2] != 0).to(pred.dtype), reduction="mean")


class YOLO26PoseLoss(YOLOv8PoseLoss):
    """YOLO26 pose loss, equal to ultralytics 8.4 ``PoseLoss26`` (module docstring): keypoints
    decoded as ``(x, y) + anchor``, OKS-based assignment
    (:class:`~detloss.assign.pose.PoseTaskAlignedAssigner`), and with a ``flow_model`` the RLE
    term "rle" (gain ``rle``, 1.0), evaluated through the flow's ``log_prob`` (e.g.
    :class:`detloss.nn.RealNVP`, the head's flow; it is a submodule of this loss, so train its
    parameters with the model's). ``rle_weights`` ``[K]``: per-keypoint RLE weights (None:
    ultralytics' COCO weights for ``(17, 3)``, else ones). Usually ``reg_max=1``.

    Call ``loss_fn(feats, kpts, kpts_sigma, targets, keypoints)`` (the head's three outputs, then
    the targets); ``kpts_sigma`` per level ``[B, 2 K, H, W]`` (the sigma logits, channel
    ``2 k + d``) is required with a flow model and ignored (may be None) without one. Components "box", "pose", "kobj", "cls", "dfl" / "l1" [, "rle"].
    """

    name = "yolo26-pose"

    def __init__(self, num_classes: int = 1, strides: Sequence[float] = (8, 16, 32), reg_max: int = 1,
                 box: float = 7.5, cls: float = 0.5, dfl: float = 1.5, tal_topk: int = 10, *,
                 flow_model: Optional[nn.Module] = None, rle: float = 1.0, rle_weights: Optional[Tensor] = None,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, strides, reg_max, box, cls, dfl, tal_topk, **kwargs)
        self.assigner = box_assigner(self.assigner, num_classes, self.strides, self.assigner.zero_ties,
                                     PoseTaskAlignedAssigner, sigmas=self.sigmas)
        self.flow_model = flow_model
        if flow_model is not None:
            if not callable(getattr(flow_model, "log_prob", None)):
                raise TypeError(f"flow_model: expected a module with log_prob (e.g. detloss.nn.RealNVP), got {type(flow_model).__name__}")
            self.add_term("rle", "rle_term", rle)
            k = self.kpt_shape[0]
            w = (COCO_RLE_WEIGHTS.clone() if self.kpt_shape == (17, 3) else torch.ones(k)) if rle_weights is None else rle_weights
            w = check_floating("rle_weights", torch.as_tensor(w))
            if tuple(w.shape) != (k,):
                raise ValueError(f"rle_weights: expected shape ({k},) (one per keypoint), got {tuple(w.shape)}")
            self.register_buffer("rle_weights", w.detach().clone(), persistent=False)

    def check(self, feats: Sequence[Tensor], kpts: Sequence[Tensor], kpts_sigma: Optional[Sequence[Tensor]],
              targets: Tensor, keypoints: Tensor) -> PoseInputs:
        if self.flow_model is not None and kpts_sigma is None:
            raise ValueError("kpts_sigma: expected the head's sigma logits per level [B, 2 K, H, W] (the loss has a flow model), got None")
        return super().check(feats, kpts, targets, keypoints, kpts_sigma=kpts_sigma if self.flow_model is not None else None)

    def decode_keypoints(self, pred_kpts: Tensor, anchor_points: Tensor) -> Tensor:
        """``(x, y) + anchor`` (grid units); further channels unchanged."""
        return torch.cat((pred_kpts[..., :2] + anchor_points[..., None, :], pred_kpts[..., 2:]), -1)

    def assignment(self, inputs: PoseInputs, prepared: PoseDecoding) -> Assignment:
        stride = prepared.stride_tensor
        pd_kpts = self.decode_keypoints(inputs.pred_kpts.detach()[..., :2], prepared.anchor_points) * stride[:, None]
        gt_kpts = inputs.keypoints[inputs.gt_rows.clamp(min=0)] * (inputs.gt_rows >= 0)[..., None, None]
        return aligned_assignment(self, inputs, prepared.pred_bboxes * stride, pd_kpts=pd_kpts, gt_kpts=gt_kpts)

    def rle_term(self, inputs: PoseInputs, prepared: PoseDecoding, assignment: Assignment) -> Tensor:
        """RLE over the positives' visible keypoints, clamped at 0."""
        if not assignment.num_pos:
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        pred, gt = prepared.pos_pred_kpts, prepared.pos_target_kpts
        vis = gt[..., 2] != 0
        if not bool(vis.any()):
            return torch.zeros((), dtype=inputs.dtype, device=inputs.device)
        sigma = gather_rows(inputs.pred_sigma, assignment.batch_index, assignment.pred_index)
        weight = self.rle_weights.to(pred.dtype).expand(vis.shape)[vis]
        loss = F.rle_loss(pred[..., :2][vis], gt[..., :2][vis], sigma_logit=sigma[vis], log_prob=self.flow_model.log_prob,
                          weight=weight)
        return loss.clamp(min=0)

