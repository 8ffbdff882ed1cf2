r"""Fused box losses: ``1 - IoU``, GIoU, DIoU and CIoU of aligned pairs with a closed-form gradient.

One elementwise pass over the pairs computes the loss and its derivative with respect to the four
predicted coordinates (the target is constant). With :math:`I` the intersection,
:math:`U = w_1 h_1 + w_2 h_2 - I + \epsilon`, :math:`C` the enclosing box (sides :math:`c_w, c_h`):

.. math::
    \mathrm{IoU} = I / U, \qquad \partial\mathrm{IoU}/\partial I = 1/U + I/U^2, \qquad
    \partial\mathrm{IoU}/\partial(w_1 h_1) = -I/U^2

    \mathrm{GIoU} = \mathrm{IoU} - P,\ P = \frac{c_w c_h - (U - \epsilon)}{c_w c_h + \epsilon}:\quad
    \partial P/\partial(c_w c_h) = (1 - P)/(c_w c_h + \epsilon),\ \partial P/\partial U = -1/(c_w c_h + \epsilon)

    \mathrm{DIoU} = \mathrm{IoU} - R,\ R = \frac{d_x^2 + d_y^2}{c_w^2 + c_h^2 + \epsilon}:\quad
    \partial R/\partial d_x = 2 d_x / c^2,\ \partial R/\partial c_w = -2 c_w R / c^2

    \mathrm{CIoU} = \mathrm{DIoU} - \alpha v,\ v = \tfrac{4}{\pi^2}(\arctan\tfrac{w_2}{h_2} - \arctan\tfrac{w_1}{h_1})^2,
    \ \alpha = v / (1 - \mathrm{IoU} + v + \epsilon) \text{ held constant}

and :math:`\partial \arctan(w/h) = (h\,\partial w - w\,\partial h) / (w^2 + h^2)`. The corners
enter through ``max``/``min`` whose derivative selects one side and splits a tie in half (as
``torch.maximum`` does). The two conventions of :func:`detloss.functional.iou_loss` differ only
where the gradient is taken at boundaries and in eps on the heights: ``"torchvision"`` counts the
intersection where it is strictly positive, ``"yolov5"`` clamps each side at 0 (no gradient at
exactly 0) and adds eps to both heights of xyxy boxes. Sources: torchvision.ops ``generalized_box_iou_loss``,
``distance_box_iou_loss``, ``complete_box_iou_loss``; YOLOv5 v7.0 / ultralytics ``bbox_iou``;
Rezatofighi et al. 2019 (GIoU), Zheng et al. 2020 (DIoU, CIoU).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ._runtime import CompiledPass, FusedLoss, cached_pass

#: The kinds with a fused pass (EIoU and SIoU run the plain formula).
FUSED_KINDS = ("iou", "giou", "diou", "ciou")

_V_SCALE = 4 / math.pi**2


def _sel_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d max(a, b) / da: 1 where a > b, 1/2 on a tie, else 0."""
    return (a > b).to(a.dtype) + 0.5 * (a == b).to(a.dtype)


def _sel_min(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d min(a, b) / da: 1 where a < b, 1/2 on a tie, else 0."""
    return (a < b).to(a.dtype) + 0.5 * (a == b).to(a.dtype)


def _corners(boxes: torch.Tensor, box_format: str, h_eps: float):
    """(x1, y1, x2, y2, w, h); w and h are the given sides for cxcywh, x2 - x1 and y2 - y1 (+ h_eps) for xyxy."""
    if box_format == "xyxy":
        x1, y1, x2, y2 = boxes.unbind(-1)
        return x1, y1, x2, y2, x2 - x1, y2 - y1 + h_eps
    cx, cy, w, h = boxes.unbind(-1)
    return cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, w, h


def _atan_ratio_and_slopes(w: torch.Tensor, h: torch.Tensor):
    """atan(w / h) (its limit where h == 0, as the functional formula) and its derivatives in w, h (0 where h == 0)."""
    ok = h > 0
    hs = torch.where(ok, h, torch.ones_like(h))
    r = w / hs
    a = torch.where(ok, torch.atan(r), torch.where(w > 0, math.pi / 2, 0.0).to(w.dtype))
    den = hs * (1 + r * r)
    dw = torch.where(ok, 1 / den, 0.0)
    dh = torch.where(ok, -r / den, 0.0)
    return a, dw, dh


def iou_closed_form(
    pred: torch.Tensor, target: torch.Tensor, *, kind: str, box_format: str, convention: str, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise ``1 - IoU_kind(pred, target)`` ``[...]`` and its derivative in ``pred`` ``[..., 4]``."""
    h_eps = eps if (convention == "yolov5" and box_format == "xyxy") else 0.0
    x1, y1, x2, y2, w1, h1 = _corners(pred, box_format, h_eps)
    X1, Y1, X2, Y2, w2, h2 = _corners(target, box_format, h_eps)

    ix1, iy1 = torch.maximum(x1, X1), torch.maximum(y1, Y1)
    ix2, iy2 = torch.minimum(x2, X2), torch.minimum(y2, Y2)
    iw, ih = ix2 - ix1, iy2 - iy1
    if convention == "torchvision":
        inside = (iy2 > iy1) & (ix2 > ix1)
        inter = torch.where(inside, iw * ih, 0.0)
        keep_w = keep_h = inside
    else:
        keep_w, keep_h = iw > 0, ih > 0
        iw, ih = torch.where(keep_w, iw, 0.0), torch.where(keep_h, ih, 0.0)
        inter = iw * ih
    u = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / u
    value = iou
    g_inter = 1 / u  # d value / d inter through the numerator
    g_union = -iou / u  # d value / d (w1 h1 + w2 h2 - inter)
    g_cw: Optional[torch.Tensor] = None
    g_ch: Optional[torch.Tensor] = None
    g_dx: Optional[torch.Tensor] = None
    g_dy: Optional[torch.Tensor] = None
    g_w1 = g_h1 = None

    if kind != "iou":
        cw = torch.maximum(x2, X2) - torch.minimum(x1, X1)
        ch = torch.maximum(y2, Y2) - torch.minimum(y1, Y1)
    if kind == "giou":
        area = cw * ch
        a_eps = area + eps
        penalty = (area - (u - eps)) / a_eps
        value = iou - penalty
        g_union = g_union + 1 / a_eps
        g_area = -(1 - penalty) / a_eps
        g_cw, g_ch = g_area * ch, g_area * cw
    elif kind in ("diou", "ciou"):
        c2 = cw * cw + ch * ch + eps
        dx = (x1 + x2) / 2 - (X1 + X2) / 2
        dy = (y1 + y2) / 2 - (Y1 + Y2) / 2
        ratio = (dx * dx + dy * dy) / c2
        value = iou - ratio
        g_dx, g_dy = -2 * dx / c2, -2 * dy / c2
        g_cw, g_ch = 2 * cw * ratio / c2, 2 * ch * ratio / c2
        if kind == "ciou":
            a1, da1_dw, da1_dh = _atan_ratio_and_slopes(w1, h1)
            a2 = _atan_ratio_and_slopes(w2, h2)[0]
            diff = a2 - a1
            v = _V_SCALE * diff * diff
            alpha = v / (1 - iou + v + eps)  # constant, as in both originals
            value = value - alpha * v
            g_a1 = 2 * _V_SCALE * alpha * diff  # d(-alpha v) / d a1
            g_w1, g_h1 = g_a1 * da1_dw, g_a1 * da1_dh

    # back through the intersection and the union
    g_i = g_inter - g_union
    g_iw = torch.where(keep_w, g_i * ih, 0.0)
    g_ih = torch.where(keep_h, g_i * iw, 0.0)
    gw1 = g_union * h1 if g_w1 is None else g_union * h1 + g_w1
    gh1 = g_union * w1 if g_h1 is None else g_union * w1 + g_h1
    gx1 = -g_iw * _sel_max(x1, X1)
    gy1 = -g_ih * _sel_max(y1, Y1)
    gx2 = g_iw * _sel_min(x2, X2)
    gy2 = g_ih * _sel_min(y2, Y2)
    if g_cw is not None and g_ch is not None:
        gx1 = gx1 - g_cw * _sel_min(x1, X1)
        gy1 = gy1 - g_ch * _sel_min(y1, Y1)
        gx2 = gx2 + g_cw * _sel_max(x2, X2)
        gy2 = gy2 + g_ch * _sel_max(y2, Y2)
    if g_dx is not None and g_dy is not None:
        gx1, gx2 = gx1 + g_dx / 2, gx2 + g_dx / 2
        gy1, gy2 = gy1 + g_dy / 2, gy2 + g_dy / 2

    # back to the input format; the loss is 1 - value, so every derivative changes sign
    if box_format == "xyxy":
        grad = torch.stack((gw1 - gx1, gh1 - gy1, -gx2 - gw1, -gy2 - gh1), dim=-1)
    else:
        grad = torch.stack(
            (-(gx1 + gx2), -(gy1 + gy2), (gx1 - gx2) / 2 - gw1, (gy1 - gy2) / 2 - gh1), dim=-1
        )
    return 1 - value, grad


def get_iou_pass(kind: str, box_format: str, convention: str, eps: float, reduction: str) -> CompiledPass:
    """The cached compiled pass of one IoU-loss configuration."""
    return cached_pass(
        "iou_loss", iou_closed_form, reduction, into_buffer=False,
        kind=kind, box_format=box_format, convention=convention, eps=float(eps),
    )


def fused_iou_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    kind: str = "giou",
    box_format: str = "xyxy",
    convention: str = "torchvision",
    reduction: str = "none",
    eps: float = 1e-7,
) -> torch.Tensor:
    """Fused :func:`detloss.functional.iou_loss` for ``kind`` in :data:`FUSED_KINDS` (validated arguments)."""
    if kind not in FUSED_KINDS:
        raise ValueError(f"kind: expected one of {FUSED_KINDS} for the fused IoU loss, got {kind!r}")
    return FusedLoss.apply(get_iou_pass(kind, box_format, convention, eps, reduction), pred, target)
