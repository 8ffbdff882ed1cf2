"""Instance and semantic mask losses: the box-cropped, area-normalized mask BCE of YOLACT-style
heads and the BCE + Dice semantic loss.

References:
    Bolya et al. 2019, "YOLACT: Real-time Instance Segmentation" (arXiv:1904.02689): masks are
    ``sigmoid(coefficients @ prototypes)``, their BCE is cropped to the ground-truth box and
    divided by the box area so that small objects are not drowned out.
    Milletari et al. 2016, "V-Net" (arXiv:1606.04797): the Dice loss.
    ultralytics 8.4 ``utils/loss.py`` (``v8SegmentationLoss.single_mask_loss``,
    ``MultiChannelDiceLoss``, ``BCEDiceLoss``) and ``utils/ops.py`` (``crop_mask``).
"""
from __future__ import annotations

import torch

from .._checks import check_floating, check_reduction, check_same_shape, compute_dtype, upcast
from ._common import reduce
from .bce import bce_with_logits

__all__ = ["crop_mask", "cropped_mask_bce", "dice_loss", "bce_dice_loss"]


def _box_window(boxes: torch.Tensor, h: int, w: int, dtype: torch.dtype):
    """Separable inside-box indicators: columns ``[N, 1, W]`` and rows ``[N, H, 1]``."""
    x1, y1, x2, y2 = boxes.to(dtype)[:, :, None].unbind(1)
    cols = torch.arange(w, device=boxes.device, dtype=dtype)[None, None, :]
    rows = torch.arange(h, device=boxes.device, dtype=dtype)[None, :, None]
    return ((cols >= x1[:, None]) & (cols < x2[:, None])), ((rows >= y1[:, None]) & (rows < y2[:, None]))


def _check_masks_boxes(name: str, masks: torch.Tensor, boxes: torch.Tensor) -> None:
    if masks.dim() != 3:
        raise ValueError(f"{name}: expected masks of shape [N, H, W], got {tuple(masks.shape)}")
    check_floating("boxes", boxes)
    if tuple(boxes.shape) != (masks.shape[0], 4):
        raise ValueError(f"boxes: expected shape ({masks.shape[0]}, 4) (xyxy in mask pixels, one per mask), got {tuple(boxes.shape)}")


def crop_mask(masks: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """``masks`` ``[N, H, W]`` with every pixel outside its box ``[N, 4]`` (xyxy in mask pixels)
    set to 0; pixel ``(i, j)`` is inside when ``x1 <= j < x2`` and ``y1 <= i < y2`` (pixel indices,
    not centres: ultralytics ``crop_mask``). Returns a new tensor."""
    _check_masks_boxes("masks", masks, boxes)
    cols, rows = _box_window(boxes, masks.shape[1], masks.shape[2], boxes.dtype)
    return masks * cols * rows


def cropped_mask_bce(
    mask_logits: torch.Tensor,
    target: torch.Tensor,
    *,
    boxes: torch.Tensor,
    area: torch.Tensor,
    reduction: str = "sum",
) -> torch.Tensor:
    r"""Per-instance mask BCE cropped to the box and normalized by the box area (YOLACT):

    .. math:: \ell_n = \frac{1}{a_n} \cdot \frac{1}{HW} \sum_{i, j \in \mathrm{box}_n}
              \mathrm{BCEWithLogits}(m_{n,ij}, y_{n,ij})

    ``mask_logits`` and ``target`` ``[N, H, W]`` (predicted mask logits, 0/1 or soft targets),
    ``boxes`` ``[N, 4]`` xyxy in mask pixels (see :func:`crop_mask`), ``area`` ``[N]`` the box
    area as a fraction of the image (ultralytics' ``marea``). An instance of zero area
    contributes 0 (its crop is empty). "sum" (the default) is ultralytics'
    ``single_mask_loss`` of one image; "none" gives ``[N]``.
    """
    check_floating("mask_logits", mask_logits)
    check_floating("target", target)
    check_same_shape("mask_logits", mask_logits, "target", target)
    check_reduction(reduction)
    _check_masks_boxes("mask_logits", mask_logits, boxes)
    check_floating("area", area)
    if tuple(area.shape) != (mask_logits.shape[0],):
        raise ValueError(f"area: expected shape ({mask_logits.shape[0]},) (one per mask), got {tuple(area.shape)}")
    dt = compute_dtype(mask_logits, target, area)
    x, y = upcast(mask_logits, dt), upcast(target, dt)
    bce = bce_with_logits(x, y, reduction="none")
    cols, rows = _box_window(boxes, x.shape[1], x.shape[2], boxes.dtype)
    per_mask = (bce * cols * rows).mean(dim=(1, 2))
    a = upcast(area, dt)
    pos = a > 0
    loss = torch.where(pos, per_mask / torch.where(pos, a, torch.ones_like(a)), torch.zeros_like(per_mask))
    return reduce(loss, reduction)


def dice_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    smooth: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""Multi-channel Dice loss on logits ``[B, C, H, W]`` against targets of the same shape:

    .. math:: \ell_b = \frac1C \sum_c \Bigl(1 - \frac{2 \sum_{ij} p_{bcij} y_{bcij} + s}
              {\sum_{ij} p_{bcij} + \sum_{ij} y_{bcij} + s}\Bigr),\qquad p = \mathrm{sigmoid}(input)

    (V-Net's Dice with smoothing ``s``; ultralytics 8.4 ``MultiChannelDiceLoss`` with the
    ``smooth=1`` ``BCEDiceLoss`` gives it). "none" gives ``[B]``.
    """
    check_floating("input", input)
    check_floating("target", target)
    check_same_shape("input", input, "target", target)
    check_reduction(reduction)
    if input.dim() != 4:
        raise ValueError(f"input: expected logits of shape [B, C, H, W], got {tuple(input.shape)}")
    if not smooth > 0:
        raise ValueError(f"smooth: expected a positive number, got {smooth!r}")
    dt = compute_dtype(input, target)
    p, y = upcast(input, dt).sigmoid(), upcast(target, dt)
    inter = (p * y).sum(dim=(2, 3))
    union = p.sum(dim=(2, 3)) + y.sum(dim=(2, 3))
    loss = (1.0 - (2.0 * inter + smooth) / (union + smooth)).mean(dim=1)
    return reduce(loss, reduction)


def bce_dice_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    *,
    bce_weight: float = 0.5,
    dice_weight: float = 0.5,
    smooth: float = 1.0,
) -> torch.Tensor:
    r"""Semantic-segmentation loss of ultralytics 8.4 ``BCEDiceLoss`` (YOLO26's semantic term):
    ``bce_weight * mean BCEWithLogits(input, target) + dice_weight * dice_loss(input, target)``
    on logits and targets ``[B, C, H, W]`` of the same size (resize the targets first; the
    original resizes them with nearest interpolation). Defaults 0.5 / 0.5, Dice smoothing 1."""
    check_floating("input", input)
    check_floating("target", target)
    check_same_shape("input", input, "target", target)
    if input.dim() != 4:
        raise ValueError(f"input: expected logits of shape [B, C, H, W], got {tuple(input.shape)}")
    dt = compute_dtype(input, target)
    x, y = upcast(input, dt), upcast(target, dt)
    bce = bce_with_logits(x, y, reduction="mean")
    return bce_weight * bce + dice_weight * dice_loss(x, y, smooth=smooth)
