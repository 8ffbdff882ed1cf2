r"""Anchor-relative box codes: the R-CNN parameterization with weights, as torchvision writes it.

Girshick et al. 2014, "Rich feature hierarchies..." (arXiv:1311.2524), appendix C; the weights and
the clamp are those of torchvision 0.29 ``models/detection/_utils.py`` ``BoxCoder``
(``encode_single`` / ``decode_single``). With an anchor of width ``w_a``, height ``h_a`` and centre
``(x_a, y_a) = (x_1 + 0.5 w_a, y_1 + 0.5 h_a)``, a box ``(x, y, w, h)`` and weights
``(w_x, w_y, w_w, w_h)``:

.. math::
    d_x = w_x \frac{x - x_a}{w_a},\quad d_y = w_y \frac{y - y_a}{h_a},\quad
    d_w = w_w \log\frac{w}{w_a},\quad d_h = w_h \log\frac{h}{h_a}

Decoding divides the codes by the weights and clamps ``d_w / w_w`` and ``d_h / w_h`` at
``bbox_xform_clip`` (default ``log(1000 / 16)``, no gradient above it) before the ``exp``.
RetinaNet uses weights (1, 1, 1, 1), SSD (10, 10, 5, 5), Faster R-CNN's box head (10, 10, 5, 5).

The operations are those of torchvision in the same order, so codes and boxes agree to the last
bit. One difference, where torchvision gives ``-inf``: a target box of zero width or height is
encoded with the log of the smallest positive ratio of the dtype (``finfo.tiny``) instead of
``log(0)``, so its loss stays finite.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

from ._checks import check_floating

__all__ = ["BoxCoder", "BBOX_XFORM_CLIP", "encode_boxes", "decode_boxes"]

#: torchvision's default clamp of the decoded log-size: ``log(1000 / 16)``.
BBOX_XFORM_CLIP = math.log(1000.0 / 16)


def _check_weights(weights: Sequence[float]) -> Tuple[float, float, float, float]:
    try:
        w = tuple(float(v) for v in weights)
    except TypeError:
        raise TypeError(f"weights: expected 4 numbers (wx, wy, ww, wh), got {weights!r}") from None
    if len(w) != 4 or not all(math.isfinite(v) and v > 0 for v in w):
        raise ValueError(f"weights: expected 4 finite positive numbers (wx, wy, ww, wh), got {tuple(weights)}")
    return w  # type: ignore[return-value]


def _check_boxes(name: str, t: object) -> Tensor:
    t = check_floating(name, t)
    if t.ndim == 0 or t.shape[-1] != 4:
        raise ValueError(f"{name}: expected shape [..., 4], got {tuple(t.shape)}")
    return t


def _anchor_frame(anchors: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(width, height, centre x, centre y) of xyxy anchors, as torchvision computes them."""
    w = anchors[..., 2] - anchors[..., 0]
    h = anchors[..., 3] - anchors[..., 1]
    return w, h, anchors[..., 0] + 0.5 * w, anchors[..., 1] + 0.5 * h


def encode_boxes(boxes: Tensor, anchors: Tensor, *, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """Codes ``(dx, dy, dw, dh)`` of xyxy ``boxes`` relative to xyxy ``anchors`` (shapes broadcast,
    last dimension 4): torchvision's ``BoxCoder(weights).encode_single(boxes, anchors)``."""
    wx, wy, ww, wh = _check_weights(weights)
    _check_boxes("boxes", boxes)
    _check_boxes("anchors", anchors)
    dtype = torch.promote_types(boxes.dtype, anchors.dtype)
    boxes, anchors = boxes.to(dtype), anchors.to(dtype)
    aw, ah, ax, ay = _anchor_frame(anchors)
    gw, gh, gx, gy = _anchor_frame(boxes)
    tiny = torch.finfo(dtype).tiny
    dx = wx * (gx - ax) / aw
    dy = wy * (gy - ay) / ah
    dw = ww * torch.log((gw / aw).clamp(min=tiny))
    dh = wh * torch.log((gh / ah).clamp(min=tiny))
    return torch.stack((dx, dy, dw, dh), dim=-1)


def decode_boxes(
    codes: Tensor,
    anchors: Tensor,
    *,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    bbox_xform_clip: float = BBOX_XFORM_CLIP,
) -> Tensor:
    """xyxy boxes from ``codes`` relative to xyxy ``anchors`` (shapes broadcast, last dimension 4):
    torchvision's ``BoxCoder(weights, bbox_xform_clip).decode_single(codes, anchors)``.

    The anchors are cast to the codes' dtype first, as torchvision does."""
    wx, wy, ww, wh = _check_weights(weights)
    _check_boxes("codes", codes)
    _check_boxes("anchors", anchors)
    anchors = anchors.to(codes.dtype)
    aw, ah, ax, ay = _anchor_frame(anchors)
    dx = codes[..., 0] / wx
    dy = codes[..., 1] / wy
    dw = torch.clamp(codes[..., 2] / ww, max=bbox_xform_clip)
    dh = torch.clamp(codes[..., 3] / wh, max=bbox_xform_clip)
    cx = dx * aw + ax
    cy = dy * ah + ay
    half_w = 0.5 * (torch.exp(dw) * aw)
    half_h = 0.5 * (torch.exp(dh) * ah)
    return torch.stack((cx - half_w, cy - half_h, cx + half_w, cy + half_h), dim=-1)


class BoxCoder:
    """Encoder / decoder of anchor-relative box codes with fixed ``weights`` and clamp.

    Args:
        weights: ``(wx, wy, ww, wh)``; default (1, 1, 1, 1) as torchvision's RetinaNet.
        bbox_xform_clip: upper clamp of the decoded log width / height ratio; default
            ``log(1000 / 16)`` as torchvision.

    ``encode(boxes, anchors)`` and ``decode(codes, anchors)`` are :func:`encode_boxes` and
    :func:`decode_boxes` with these settings.
    """

    def __init__(
        self, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0), bbox_xform_clip: float = BBOX_XFORM_CLIP
    ) -> None:
        self.weights = _check_weights(weights)
        clip = float(bbox_xform_clip)
        if math.isnan(clip):
            raise ValueError(f"bbox_xform_clip: expected a number, got {bbox_xform_clip!r}")
        self.bbox_xform_clip = clip

    def __repr__(self) -> str:
        return f"BoxCoder(weights={self.weights}, bbox_xform_clip={self.bbox_xform_clip})"

    def encode(self, boxes: Tensor, anchors: Tensor) -> Tensor:
        return encode_boxes(boxes, anchors, weights=self.weights)

    def decode(self, codes: Tensor, anchors: Tensor) -> Tensor:
        return decode_boxes(codes, anchors, weights=self.weights, bbox_xform_clip=self.bbox_xform_clip)
