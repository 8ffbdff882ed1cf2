"""``nn.Module`` twins of the functional losses in :mod:`detloss.functional`.

Each module stores its hyperparameters (tensors such as ``weight`` / ``pos_weight`` as buffers, so
they follow ``.to(device)``) and calls the functional loss in ``forward``; the formulas and their
sources are in the functional docstrings.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from . import functional as F
from ._checks import check_choice, check_reduction
from ._nn_tasks import BCEDiceLoss, CroppedMaskBCELoss, KeypointLoss, ProbIoULoss, RealNVP, RLELoss, RotatedAngleLoss

__all__ = [
    "BCELoss",
    "BCEWithLogitsLoss",
    "BCEBlurWithLogitsLoss",
    "CrossEntropyLoss",
    "SigmoidFocalLoss",
    "SoftmaxFocalLoss",
    "QualityFocalLoss",
    "VarifocalLoss",
    "SmoothL1Loss",
    "L1Loss",
    "MSELoss",
    "IoULoss",
    "DistributionFocalLoss",
    "ProbIoULoss", "RotatedAngleLoss", "KeypointLoss", "RLELoss", "CroppedMaskBCELoss", "BCEDiceLoss", "RealNVP",
]


class _Loss(nn.Module):
    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class BCELoss(_Loss):
    """Module form of :func:`detloss.functional.binary_cross_entropy` (probabilities)."""

    def __init__(self, *, weight: Optional[torch.Tensor] = None, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.register_buffer("weight", weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy(input, target, weight=self.weight, reduction=self.reduction)


class BCEWithLogitsLoss(_Loss):
    """Module form of :func:`detloss.functional.bce_with_logits`."""

    def __init__(
        self,
        *,
        weight: Optional[torch.Tensor] = None,
        pos_weight: Optional[torch.Tensor] = None,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.register_buffer("weight", weight)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.bce_with_logits(
            input, target, weight=self.weight, pos_weight=self.pos_weight, reduction=self.reduction
        )


class BCEBlurWithLogitsLoss(_Loss):
    """Module form of :func:`detloss.functional.bce_blur` (YOLOv5, alpha=0.05)."""

    def __init__(self, *, alpha: float = 0.05, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.alpha = float(alpha)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.bce_blur(input, target, alpha=self.alpha, reduction=self.reduction)


class CrossEntropyLoss(_Loss):
    """Module form of :func:`detloss.functional.cross_entropy`."""

    def __init__(
        self,
        *,
        weight: Optional[torch.Tensor] = None,
        ignore_index: int = -100,
        label_smoothing: float = 0.0,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.register_buffer("weight", weight)
        self.ignore_index = int(ignore_index)
        self.label_smoothing = float(label_smoothing)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            input,
            target,
            weight=self.weight,
            ignore_index=self.ignore_index,
            label_smoothing=self.label_smoothing,
            reduction=self.reduction,
        )


class SigmoidFocalLoss(_Loss):
    """Module form of :func:`detloss.functional.sigmoid_focal_loss` (torchvision defaults;
    ``pos_weight``, a buffer, as YOLOv5's FocalLoss around ``BCEWithLogitsLoss(pos_weight=...)``)."""

    def __init__(
        self,
        *,
        alpha: float = 0.25,
        gamma: float = 2.0,
        reduction: str = "none",
        pos_weight: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__(reduction=reduction)
        self.alpha, self.gamma = float(alpha), float(gamma)
        self.register_buffer("pos_weight", pos_weight)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.sigmoid_focal_loss(
            input, target, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction, pos_weight=self.pos_weight
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, gamma={self.gamma}, reduction={self.reduction!r}"


class SoftmaxFocalLoss(_Loss):
    """Module form of :func:`detloss.functional.softmax_focal_loss`."""

    def __init__(
        self,
        *,
        weight: Optional[torch.Tensor] = None,
        alpha: float = 0.25,
        gamma: float = 2.0,
        ignore_index: int = -100,
        reduction: str = "mean",
    ) -> None:
        super().__init__(reduction=reduction)
        self.register_buffer("weight", weight)
        self.alpha, self.gamma, self.ignore_index = float(alpha), float(gamma), int(ignore_index)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.softmax_focal_loss(
            input,
            target,
            weight=self.weight,
            alpha=self.alpha,
            gamma=self.gamma,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
        )


class QualityFocalLoss(_Loss):
    """Module form of :func:`detloss.functional.quality_focal_loss` (GFL's QFL by default)."""

    def __init__(self, *, gamma: float = 2.0, alpha: Optional[float] = None, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.gamma, self.alpha = float(gamma), alpha

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.quality_focal_loss(input, target, gamma=self.gamma, alpha=self.alpha, reduction=self.reduction)


class VarifocalLoss(_Loss):
    """Module form of :func:`detloss.functional.varifocal_loss`."""

    def __init__(self, *, alpha: float = 0.75, gamma: float = 2.0, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.alpha, self.gamma = float(alpha), float(gamma)

    def forward(self, input: torch.Tensor, target_score: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.varifocal_loss(
            input, target_score, label, alpha=self.alpha, gamma=self.gamma, reduction=self.reduction
        )


class SmoothL1Loss(_Loss):
    """Module form of :func:`detloss.functional.smooth_l1_loss`."""

    def __init__(self, *, beta: float = 1.0, reduction: str = "mean") -> None:
        super().__init__(reduction=reduction)
        self.beta = float(beta)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.smooth_l1_loss(input, target, beta=self.beta, reduction=self.reduction)


class L1Loss(_Loss):
    """Module form of :func:`detloss.functional.l1_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(input, target, reduction=self.reduction)


class MSELoss(_Loss):
    """Module form of :func:`detloss.functional.mse_loss`."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class IoULoss(_Loss):
    """Module form of :func:`detloss.functional.iou_loss`: ``1 - IoU_kind(pred, target)``
    (``validate=False`` for predictions that may be inverted boxes)."""

    def __init__(
        self,
        *,
        kind: str = "giou",
        box_format: str = "xyxy",
        convention: str = "torchvision",
        reduction: str = "none",
        eps: float = 1e-7,
        validate: bool = True,
    ) -> None:
        super().__init__(reduction=reduction)
        from .functional.iou import BOX_FORMATS, CONVENTIONS, KINDS

        self.kind = check_choice("kind", kind, KINDS)
        self.box_format = check_choice("box_format", box_format, BOX_FORMATS)
        self.convention = check_choice("convention", convention, CONVENTIONS)
        self.eps = float(eps)
        self.validate = bool(validate)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.iou_loss(
            pred,
            target,
            kind=self.kind,
            box_format=self.box_format,
            convention=self.convention,
            reduction=self.reduction,
            eps=self.eps,
            validate=self.validate,
        )

    def extra_repr(self) -> str:
        return (f"kind={self.kind!r}, box_format={self.box_format!r}, convention={self.convention!r}, "
                f"reduction={self.reduction!r}" + ("" if self.validate else ", validate=False"))


class DistributionFocalLoss(_Loss):
    """Module form of :func:`detloss.functional.distribution_focal_loss`."""

    def forward(
        self, pred_dist: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return F.distribution_focal_loss(pred_dist, target, reduction=self.reduction, weight=weight)


