"""``nn.Module`` twins of the rotated-box, keypoint and mask losses, and the RealNVP flow of RLE.

Exported through :mod:`detloss.nn`; formulas and sources are in the functional docstrings
(:mod:`detloss.functional.rotated`, :mod:`~detloss.functional.keypoints`,
:mod:`~detloss.functional.masks`).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from . import functional as F
from ._checks import check_reduction

__all__ = ["ProbIoULoss", "RotatedAngleLoss", "KeypointLoss", "RLELoss", "CroppedMaskBCELoss", "BCEDiceLoss", "RealNVP"]


class ProbIoULoss(nn.Module):
    """Module form of :func:`detloss.functional.probiou_loss` (variance floor 0.01)."""

    def __init__(self, *, floor: float = F.rotated.PROBIOU_LOSS_FLOOR, eps: float = 1e-7, reduction: str = "none") -> None:
        super().__init__()
        self.floor, self.eps, self.reduction = float(floor), float(eps), check_reduction(reduction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.probiou_loss(pred, target, floor=self.floor, eps=self.eps, weight=weight, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"floor={self.floor}, eps={self.eps}, reduction={self.reduction!r}"


class RotatedAngleLoss(nn.Module):
    """Module form of :func:`detloss.functional.rotated_angle_loss` (aspect_lambda 3)."""

    def __init__(self, *, aspect_lambda: float = 3.0, reduction: str = "none") -> None:
        super().__init__()
        self.aspect_lambda, self.reduction = float(aspect_lambda), check_reduction(reduction)

    def forward(self, pred_angle: torch.Tensor, target_angle: torch.Tensor, target_wh: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.rotated_angle_loss(pred_angle, target_angle, target_wh=target_wh, aspect_lambda=self.aspect_lambda,
                                    weight=weight, reduction=self.reduction)


class KeypointLoss(nn.Module):
    """Module form of :func:`detloss.functional.keypoint_loss`; ``sigmas`` ``[K]`` is a buffer
    (default: COCO's 17 :data:`~detloss.functional.keypoints.COCO_KEYPOINT_SIGMAS`)."""

    def __init__(self, *, sigmas: Optional[torch.Tensor] = None, reduction: str = "mean") -> None:
        super().__init__()
        self.register_buffer("sigmas", (F.keypoints.COCO_KEYPOINT_SIGMAS if sigmas is None else sigmas).clone())
        self.reduction = check_reduction(reduction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, visible: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
        return F.keypoint_loss(pred, target, visible=visible, area=area, sigmas=self.sigmas, reduction=self.reduction)


class RLELoss(nn.Module):
    """Module form of :func:`detloss.functional.rle_loss` that owns its flow (``flow``: a module
    with ``log_prob``, by default a fresh :class:`RealNVP`); train the flow's parameters with the
    model."""

    def __init__(self, *, flow: Optional[nn.Module] = None, residual: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        self.flow = RealNVP() if flow is None else flow
        self.residual, self.reduction = bool(residual), check_reduction(reduction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, sigma_logit: torch.Tensor,
                weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.rle_loss(pred, target, sigma_logit=sigma_logit, log_prob=self.flow.log_prob, weight=weight,
                          residual=self.residual, reduction=self.reduction)


class CroppedMaskBCELoss(nn.Module):
    """Module form of :func:`detloss.functional.cropped_mask_bce`."""

    def __init__(self, *, reduction: str = "sum") -> None:
        super().__init__()
        self.reduction = check_reduction(reduction)

    def forward(self, mask_logits: torch.Tensor, target: torch.Tensor, boxes: torch.Tensor, area: torch.Tensor) -> torch.Tensor:
        return F.cropped_mask_bce(mask_logits, target, boxes=boxes, area=area, reduction=self.reduction)


class BCEDiceLoss(nn.Module):
    """Module form of :func:`detloss.functional.bce_dice_loss` (0.5 BCE + 0.5 Dice, smoothing 1)."""

    def __init__(self, *, bce_weight: float = 0.5, dice_weight: float = 0.5, smooth: float = 1.0) -> None:
        super().__init__()
        self.bce_weight, self.dice_weight, self.smooth = float(bce_weight), float(dice_weight), float(smooth)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.bce_dice_loss(input, target, bce_weight=self.bce_weight, dice_weight=self.dice_weight, smooth=self.smooth)


def _coupling_net(hidden: int, bounded: bool) -> nn.Sequential:
    layers = [nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2)]
    return nn.Sequential(*layers, nn.Tanh()) if bounded else nn.Sequential(*layers)


class RealNVP(nn.Module):
    """The 2-D RealNVP flow of RLE (Dinh et al. 2017; mmpose, ultralytics 8.4 ``Pose26``).

    ``num_layers`` affine coupling layers with alternating masks ``[0, 1], [1, 0], ...``; layer
    ``i`` has a scale net ``s[i]`` (Linear-SiLU-Linear-SiLU-Linear-Tanh, ``hidden`` units) and a
    translation net ``t[i]`` (the same without Tanh). Parameter and buffer names (``s.i.j.*``,
    ``t.i.j.*``, ``mask``, and the unused prior buffers ``loc`` / ``cov``) are those of
    ultralytics' ``RealNVP``, so either's ``state_dict`` loads into the other. Weights start
    Xavier-uniform with gain 0.01 (the original's initialization). :meth:`log_prob` is
    :func:`detloss.functional.realnvp_log_prob` on this module's own tensors (gradients reach
    its parameters); ``square_in_float32`` repeats ultralytics' float32 squaring of the latent.
    """

    def __init__(self, *, num_layers: int = 6, hidden: int = 64, square_in_float32: bool = False) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected a positive int, got {num_layers!r}")
        self.register_buffer("loc", torch.zeros(2))
        self.register_buffer("cov", torch.eye(2))
        self.register_buffer("mask", torch.tensor([[0.0, 1.0], [1.0, 0.0]] * ((num_layers + 1) // 2))[:num_layers].clone())
        self.s = nn.ModuleList([_coupling_net(hidden, True) for _ in range(num_layers)])
        self.t = nn.ModuleList([_coupling_net(hidden, False) for _ in range(num_layers)])
        self.square_in_float32 = bool(square_in_float32)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=0.01)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density ``[N]`` of ``x`` ``[N, 2]``."""
        state = dict(self.named_parameters())
        state["mask"] = self.mask
        return F.realnvp_log_prob(x, state, square_in_float32=self.square_in_float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.log_prob(x)
