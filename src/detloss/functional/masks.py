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

from typing import Optional

import torch

from .._checks import check_floating, check_reduction, check_same_shape, check_tensor, compute_dtype, upcast
from ._common import reduce
from .bce import bce_with_logits

__all__ = ["crop_mask", "cropped_mask_bce", "prototype_mask_bce", "dice_loss", "bce_dice_loss"]


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


#: :func:`prototype_mask_bce` decodes at most this many mask pixels at a time.
PROTO_CHUNK_PIXELS = 1 << 22


def _proto_chunks(image: torch.Tensor, rows: int):
    """``(image, indices)`` chunks of the instances of each image, at most ``rows`` long."""
    order = torch.argsort(image, stable=True)
    counts = torch.bincount(image).tolist() if image.numel() else []
    start = 0
    for b, c in enumerate(counts):  # a loop over images and memory chunks, not over instances
        for i in range(0, c, rows):
            yield b, order[start + i : start + min(i + rows, c)]
        start += c


def _chunk_targets(masks, mask_index, mask_value, b, idx, dtype):
    """Targets ``[c, H*W]`` of the chunk ``idx`` (instances of image ``b``)."""
    t = masks[b][None] if mask_index is None else masks[mask_index[idx]]  # one map per image: no copy per instance
    if mask_value is not None:
        t = t == mask_value[idx][:, None, None]  # mask_value has the masks' dtype (see prototype_mask_bce)
    return t.flatten(1).to(dtype)


class _PrototypeMaskBCE(torch.autograd.Function):
    """:func:`prototype_mask_bce`'s value and gradient, chunk by chunk: the logits are decoded
    again in backward instead of being kept, so nothing of size instances x pixels outlives a chunk."""

    @staticmethod
    def forward(ctx, coef, proto, area, image, masks, mask_index, mask_value, boxes):  # type: ignore[override]
        n, (nm, h, w) = coef.shape[0], proto.shape[1:]
        rows = max(1, PROTO_CHUNK_PIXELS // max(h * w, 1))
        flat = proto.flatten(2)
        sums = coef.new_zeros(n)
        cols_all, rows_all = _box_window(boxes, h, w, coef.dtype)
        for b, idx in _proto_chunks(image, rows):
            x = coef[idx] @ flat[b]
            y = _chunk_targets(masks, mask_index, mask_value, b, idx, x.dtype)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y, reduction="none")
            # sum over the box: rows^T (bce) cols, without an instances x pixels product
            inner = torch.bmm(bce.view(-1, h, w), cols_all[idx].to(x.dtype).transpose(1, 2))  # [c, h, 1]
            sums[idx] = (inner[:, :, 0] * rows_all[idx][:, :, 0].to(x.dtype)).sum(1)
        mean = sums / (h * w)
        pos = area > 0
        safe = torch.where(pos, area, torch.ones_like(area))
        per = torch.where(pos, mean / safe, torch.zeros_like(mean))
        ctx.save_for_backward(coef, proto, area, image, masks, mask_index, mask_value, boxes, per)
        ctx.has_value, ctx.has_index = mask_value is not None, mask_index is not None
        return per

    @staticmethod
    def backward(ctx, grad_per):  # type: ignore[override]
        coef, proto, area, image, masks, mask_index, mask_value, boxes, per = ctx.saved_tensors
        mask_value = mask_value if ctx.has_value else None
        mask_index = mask_index if ctx.has_index else None
        h, w = proto.shape[-2:]
        pos = area > 0
        safe = torch.where(pos, area, torch.ones_like(area))
        scale = torch.where(pos, grad_per / (safe * (h * w)), torch.zeros_like(grad_per))
        grad_coef = torch.zeros_like(coef) if ctx.needs_input_grad[0] else None
        grad_proto = torch.zeros_like(proto) if ctx.needs_input_grad[1] else None
        if grad_coef is not None or grad_proto is not None:
            rows = max(1, PROTO_CHUNK_PIXELS // max(h * w, 1))
            flat = proto.flatten(2)
            cols_all, rows_all = _box_window(boxes, h, w, coef.dtype)
            for b, idx in _proto_chunks(image, rows):
                x = coef[idx] @ flat[b]
                y = _chunk_targets(masks, mask_index, mask_value, b, idx, x.dtype)
                g = torch.sigmoid(x).sub_(y).view(-1, h, w)
                g.mul_(rows_all[idx].to(x.dtype) * scale[idx, None, None]).mul_(cols_all[idx].to(x.dtype))  # 0 outside the box
                g = g.view(-1, h * w)
                if grad_coef is not None:
                    grad_coef[idx] = g @ flat[b].transpose(0, 1)
                if grad_proto is not None:
                    grad_proto[b] += (coef[idx].transpose(0, 1) @ g).view(-1, h, w)
        grad_area = None
        if ctx.needs_input_grad[2]:
            grad_area = torch.where(pos, -grad_per * per / safe, torch.zeros_like(per))
        return grad_coef, grad_proto, grad_area, None, None, None, None, None


def prototype_mask_bce(
    coef: torch.Tensor,
    proto: torch.Tensor,
    masks: torch.Tensor,
    *,
    boxes: torch.Tensor,
    area: torch.Tensor,
    image: Optional[torch.Tensor] = None,
    mask_index: Optional[torch.Tensor] = None,
    mask_value: Optional[torch.Tensor] = None,
    reduction: str = "sum",
) -> torch.Tensor:
    r""":func:`cropped_mask_bce` of masks decoded from coefficients and prototypes (YOLACT,
    ultralytics ``v8SegmentationLoss``), without keeping the decoded masks:

    .. math:: \ell_n = \frac{1}{a_n} \frac{1}{HW} \sum_{ij \in \mathrm{box}_n}
              \mathrm{BCEWithLogits}\bigl((c_n^\top P_{image_n})_{ij}, y_{n,ij}\bigr)

    ``coef [N, nm]`` mask coefficients; ``proto`` ``[B, nm, H, W]`` prototypes with ``image [N]``
    the image of each instance (or ``[nm, H, W]`` for one image); ``masks [T, H, W]`` the target
    masks, instance ``n``'s being ``masks[mask_index[n]]`` (``mask_index`` None: ``masks[image[n]]``,
    one map per image) (0/1, or, with ``mask_value [N]``, ``masks[...] == mask_value[n]``:
    instance-index maps); ``boxes [N, 4]`` xyxy in mask
    pixels, ``area [N]`` the box area as a fraction of the image. Equals
    ``cropped_mask_bce(coef @ proto[image], target, boxes=boxes, area=area)``; the decoded
    logits are computed in chunks of :data:`PROTO_CHUNK_PIXELS` pixels and again in backward,
    so memory does not grow with instances x pixels. Gradients flow to ``coef``, ``proto`` and
    ``area``, not to the targets.
    """
    check_reduction(reduction)
    check_floating("coef", coef)
    check_floating("proto", proto)
    if coef.dim() != 2:
        raise ValueError(f"coef: expected [N, nm] mask coefficients, got {tuple(coef.shape)}")
    n, nm = coef.shape
    if proto.dim() == 3:
        proto = proto[None]
        image = torch.zeros(n, dtype=torch.long, device=coef.device) if image is None else image
    if proto.dim() != 4 or proto.shape[1] != nm:
        raise ValueError(f"proto: expected [B, {nm}, H, W] or [{nm}, H, W] prototypes (nm like coef), got {tuple(proto.shape)}")
    if image is None or tuple(image.shape) != (n,) or image.dtype != torch.long:
        raise ValueError(f"image: expected int64 [{n}] (the prototypes of each instance), got {None if image is None else (image.dtype, tuple(image.shape))}")
    if n and bool(((image < 0) | (image >= proto.shape[0])).any()):
        raise ValueError(f"image: expected indices in [0, {proto.shape[0] - 1}]")
    h, w = proto.shape[-2:]
    check_tensor("masks", masks)
    if masks.dim() != 3 or tuple(masks.shape[1:]) != (h, w):
        raise ValueError(f"masks: expected [T, {h}, {w}] (the prototypes' size), got {tuple(masks.shape)}")
    for name, t in (("mask_index", mask_index), ("mask_value", mask_value)):
        if t is not None and (tuple(t.shape) != (n,) or t.is_floating_point()):
            raise ValueError(f"{name}: expected an integer tensor [{n}], got {t.dtype} {tuple(t.shape)}")
    if mask_index is None and masks.shape[0] != proto.shape[0]:
        raise ValueError(f"masks: expected one map per image, [{proto.shape[0]}, {h}, {w}] (mask_index is None), got {tuple(masks.shape)}")
    if mask_index is not None and n and bool(((mask_index < 0) | (mask_index >= masks.shape[0])).any()):
        raise ValueError(f"mask_index: expected indices in [0, {masks.shape[0] - 1}]")
    check_floating("boxes", boxes)
    if tuple(boxes.shape) != (n, 4):
        raise ValueError(f"boxes: expected shape ({n}, 4) (xyxy in mask pixels, one per instance), got {tuple(boxes.shape)}")
    check_floating("area", area)
    if tuple(area.shape) != (n,):
        raise ValueError(f"area: expected shape ({n},) (one per instance), got {tuple(area.shape)}")
    if mask_value is not None and masks.dtype != mask_value.dtype and not masks.is_floating_point():
        # compare in the masks' own dtype (a cheap comparison), unless some value does not fit in it
        lo, hi = (0, 1) if masks.dtype == torch.bool else (torch.iinfo(masks.dtype).min, torch.iinfo(masks.dtype).max)
        if not n or bool(((mask_value >= lo) & (mask_value <= hi)).all()):
            mask_value = mask_value.to(masks.dtype)
        else:
            masks = masks.to(mask_value.dtype)
    dt = compute_dtype(coef, proto, area)
    per = _PrototypeMaskBCE.apply(upcast(coef, dt), upcast(proto, dt), upcast(area, dt), image, masks, mask_index,
                                  mask_value, boxes.detach())
    return reduce(per, reduction)
