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

from typing import Callable, Optional, Tuple

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

#: Window sides are padded up to the next of these (then to the grid's side): windows of similar
#: size share one batched product, at most 1.5x larger than they need on a side.
WINDOW_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)


def box_windows(boxes: torch.Tensor, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """int64 ``[N, 4]`` ``(x0, y0, width, height)``: the pixel index ranges ``x0 <= j < x0 + width``,
    ``y0 <= i < y0 + height`` of the pixels :func:`crop_mask` keeps for the xyxy ``boxes`` (its test
    ``x1 <= j < x2`` in ``dtype``, on integer ``j``: ``ceil(x1) <= j < ceil(x2)``), clipped to the
    ``h x w`` grid; an empty box has width or height 0."""
    b = boxes.detach().to(dtype).ceil()
    x0, y0, x1, y1 = b.unbind(-1)
    x0, x1 = x0.clamp(0, w), x1.clamp(0, w)
    y0, y1 = y0.clamp(0, h), y1.clamp(0, h)
    out = torch.stack((x0, y0, torch.maximum(x1 - x0, torch.zeros_like(x0)), torch.maximum(y1 - y0, torch.zeros_like(y0))), -1)
    return out.long()


def window_groups(sizes: torch.Tensor, h: int, w: int, rows_of: "Callable[[int, int], int]"):
    """Items of window sizes ``sizes [N, 2]`` (width, height) grouped by padded size
    (:data:`WINDOW_LADDER`, at most the grid's ``w``, ``h``): a list of ``(items, qw, qh)``, ``items``
    int64 indices, each group cut into chunks of at most ``rows_of(qw, qh)`` items. Empty windows
    are left out. One host synchronization."""
    if not sizes.shape[0]:
        return []
    ladder = torch.tensor(WINDOW_LADDER, device=sizes.device)
    qw = torch.minimum(ladder[torch.searchsorted(ladder, sizes[:, 0].contiguous()).clamp(max=len(WINDOW_LADDER) - 1)], sizes.new_tensor(w))
    qh = torch.minimum(ladder[torch.searchsorted(ladder, sizes[:, 1].contiguous()).clamp(max=len(WINDOW_LADDER) - 1)], sizes.new_tensor(h))
    qw = torch.maximum(qw, sizes[:, 0])  # beyond the ladder: the size itself
    qh = torch.maximum(qh, sizes[:, 1])
    key = torch.where((sizes > 0).all(-1), qh * (w + 1) + qw, -1)
    order = torch.argsort(key, stable=True)
    uniq, counts = torch.unique_consecutive(key[order], return_counts=True)
    out, start = [], 0
    for k, c in zip(uniq.tolist(), counts.tolist()):
        if k >= 0:
            gh, gw = divmod(k, w + 1)
            rows = max(1, rows_of(gw, gh))
            for i in range(0, c, rows):
                out.append((order[start + i : start + min(i + rows, c)], gw, gh))
        start += c
    return out


def window_pixels(win: torch.Tensor, qw: int, qh: int, h: int, w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For windows ``win [n, 4]`` (:func:`box_windows`) padded to ``qh x qw``: the pixel index
    ``i * w + j`` ``[n, qh * qw]`` of each padded position (clamped to the grid) and whether it lies
    in the window (bool, same shape)."""
    dev = win.device
    dx = torch.arange(qw, device=dev)
    dy = torch.arange(qh, device=dev)
    x0, y0, ww, hh = win[:, 0, None], win[:, 1, None], win[:, 2, None], win[:, 3, None]
    cols = (x0 + dx).clamp(max=w - 1)
    rows = (y0 + dy).clamp(max=h - 1)
    valid = ((dy < hh)[:, :, None] & (dx < ww)[:, None, :]).view(win.shape[0], -1)
    return (rows[:, :, None] * w + cols[:, None, :]).view(win.shape[0], -1), valid


def _bce_groups(coef, image, masks, mask_index, mask_value, boxes, h, w):
    """The instances grouped by what their loss reads: the window (:func:`box_windows`), the image
    and the target mask. Returns ``(groups, slots, key_image, key_window, key_target)``: per unique
    key its image, window and target selector (the mask index, or the image and ``mask_value``), and
    ``slots [U, kmax]`` its instances (-1: none), with ``groups`` :func:`window_groups` of the keys."""
    n = coef.shape[0]
    win = box_windows(boxes, h, w, coef.dtype)
    sel = mask_index if mask_index is not None else image
    cols = [image[:, None], sel[:, None].to(torch.int64), win]
    if mask_value is not None:
        cols.append(mask_value[:, None].to(torch.int64))
    keys, inv = torch.unique(torch.cat(cols, 1), dim=0, return_inverse=True)
    order = torch.argsort(inv, stable=True)
    counts = torch.bincount(inv, minlength=keys.shape[0])
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=coef.device) - first[inv[order]]
    kmax = int(counts.max()) if n else 1
    slots = torch.full((keys.shape[0], kmax), -1, dtype=torch.long, device=coef.device)
    slots[inv[order], rank] = order
    key_win = keys[:, 2:6]
    budget = PROTO_CHUNK_PIXELS
    groups = window_groups(key_win[:, 2:4], h, w, lambda gw, gh: budget // max(gw * gh * kmax, 1))
    return groups, slots, keys[:, 0], keys[:, 1], key_win, (keys[:, 6] if mask_value is not None else None)


def _group_targets(masks, flat_pix, sel, value, dtype):
    """Targets ``[n, P]`` at the window pixels ``flat_pix [n, P]`` of masks ``masks[sel]`` (== value)."""
    hw = masks.shape[1] * masks.shape[2]
    t = masks.reshape(-1)[sel[:, None] * hw + flat_pix]
    if value is not None:
        t = t == value.to(masks.dtype)[:, None]
    return t.to(dtype)


class _PrototypeMaskBCE(torch.autograd.Function):
    """:func:`prototype_mask_bce`'s value and gradient over the box windows only.

    The loss of an instance reads only the pixels inside its box, and the instances of one target
    (same image, box and target mask) share those pixels: per distinct target, its window of the
    prototypes ``[px, nm]`` (channels last) times its instances' coefficients gives their logits;
    targets of similar window size share one batched product (:func:`window_groups`). The logits
    are decoded again in backward instead of being kept."""

    @staticmethod
    def forward(ctx, coef, proto, area, image, masks, mask_index, mask_value, boxes):  # type: ignore[override]
        n, (nm, h, w) = coef.shape[0], proto.shape[1:]
        protos = proto.reshape(-1, h * w)  # [B * nm, h * w]
        chan = torch.arange(nm, device=coef.device)
        sums = coef.new_zeros(n)
        groups, slots, kimg, ksel, kwin, kval = _bce_groups(coef, image, masks, mask_index, mask_value, boxes, h, w)
        for items, qw, qh in groups:
            pix, valid = window_pixels(kwin[items], qw, qh, h, w)
            win = protos[(kimg[items] * nm)[:, None, None] + chan[:, None], pix[:, None, :]]  # [u, nm, P]
            inst = slots[items]
            c = coef[inst.clamp(min=0)]  # [u, k, nm]
            x = torch.bmm(c, win)  # [u, k, P]
            y = _group_targets(masks, pix, ksel[items], None if kval is None else kval[items], x.dtype)
            bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y[:, None].expand_as(x), reduction="none")
            s = (bce * valid[:, None].to(x.dtype)).sum(-1)  # [u, k]
            keep = inst >= 0
            sums[inst[keep]] = s[keep]
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
        nm, h, w = proto.shape[1:]
        pos = area > 0
        safe = torch.where(pos, area, torch.ones_like(area))
        scale = torch.where(pos, grad_per / (safe * (h * w)), torch.zeros_like(grad_per))
        need_coef, need_proto = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_coef = torch.zeros_like(coef) if need_coef else None
        grad_proto = None
        if need_coef or need_proto:
            protos = proto.reshape(-1, h * w)
            chan = torch.arange(nm, device=coef.device)
            grad_protos = torch.zeros_like(protos) if need_proto else None
            groups, slots, kimg, ksel, kwin, kval = _bce_groups(coef, image, masks, mask_index, mask_value, boxes, h, w)
            for items, qw, qh in groups:
                pix, valid = window_pixels(kwin[items], qw, qh, h, w)
                where = ((kimg[items] * nm)[:, None, None] + chan[:, None], pix[:, None, :])
                win = protos[where]  # [u, nm, P]
                inst = slots[items]
                keep = inst >= 0
                safe_inst = inst.clamp(min=0)
                c = coef[safe_inst]
                x = torch.bmm(c, win)
                y = _group_targets(masks, pix, ksel[items], None if kval is None else kval[items], x.dtype)
                g = torch.sigmoid(x).sub_(y[:, None])
                g.mul_(valid[:, None].to(x.dtype)).mul_((scale[safe_inst] * keep)[:, :, None])  # 0 outside the box
                if grad_coef is not None:
                    gc = torch.bmm(g, win.transpose(1, 2))  # [u, k, nm]
                    grad_coef[inst[keep]] = gc[keep]
                if grad_protos is not None:  # padding positions add 0 (g is 0 there)
                    grad_protos.index_put_(where, torch.bmm(c.transpose(1, 2), g), accumulate=True)
            if grad_protos is not None:
                grad_proto = grad_protos.view(proto.shape)
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
