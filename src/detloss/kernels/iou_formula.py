"""The IoU family as autograd formulas: IoU, GIoU, DIoU, CIoU, EIoU, SIoU, in two conventions.

These are the values of :func:`detloss.functional.aligned_box_iou` and
:func:`detloss.functional.pairwise_box_iou` (validated tensors in the compute dtype), and the
formula behind the fused box losses (:mod:`detloss.kernels.iou`). Two conventions, each
reproducing its original to the last digit that matters:

* ``"torchvision"``: torchvision.ops ``generalized_box_iou_loss``, ``distance_box_iou_loss``,
  ``complete_box_iou_loss`` (aligned pairs; eps=1e-7 added to the union, the enclosing area and
  the enclosing diagonal; the intersection counts only where it is strictly positive; CIoU's
  alpha = v / (1 - IoU + v + eps) without gradient) and ``box_iou`` / ``generalized_box_iou``,
  ``distance_box_iou``, ``complete_box_iou`` (pairwise matrices; no eps on the union).
* ``"yolov5"``: YOLOv5 v7.0 ``utils/metrics.py`` ``bbox_iou`` (identical to ultralytics'
  ``bbox_iou``): with xyxy input eps is added to both heights, always to the union, the
  enclosing area and the enclosing diagonal; CIoU's alpha = v / (v - IoU + 1 + eps) without
  gradient.

Every pair is first scaled by a power of two, :func:`scale_pairs`, so that its largest coordinate
lies in [1, 2): areas and squared distances of float32 boxes neither overflow (coordinates of
1e20) nor underflow (sides of 1e-20). The value is unchanged: scaling by a power of two is exact,
the eps of the originals is scaled with the quantity it is added to, and every IoU kind is a ratio
of quantities in the same units.

Papers: GIoU, Rezatofighi et al. 2019 (arXiv:1902.09630); DIoU/CIoU, Zheng et al. 2020
(arXiv:1911.08287); EIoU, Zhang et al. 2021, "Focal and Efficient IOU Loss" (arXiv:2101.08158);
SIoU, Gevorgyan 2022, "SIoU Loss: More Powerful Learning for Bounding Box Regression"
(arXiv:2205.12740).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Tuple, Union

import torch

__all__ = ["KINDS", "CONVENTIONS", "BOX_FORMATS", "SIOU_THETA", "Eps", "scale_pairs", "box_iou_formula",
           "iou_loss_formula"]

KINDS = ("iou", "giou", "diou", "ciou", "eiou", "siou")
CONVENTIONS = ("torchvision", "yolov5")
BOX_FORMATS = ("xyxy", "cxcywh")
#: SIoU's shape-cost exponent theta (Gevorgyan 2022 uses 4).
SIOU_THETA = 4.0

Scalar = Union[torch.Tensor, float]

_EXPONENT_BITS = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000)}


class Eps(NamedTuple):
    """The originals' eps in the units of the scaled boxes: added to a length (YOLOv5's heights,
    SIoU's shape cost), to an area (unions, enclosing areas, squared diagonals), or to a pure
    number (CIoU's alpha)."""

    length: Scalar
    area: Scalar
    unit: float


def inverse_power_of_two(m: torch.Tensor) -> torch.Tensor:
    """``2 ** -e`` with ``2 ** e <= m < 2 ** (e + 1)``, exactly (read from the exponent bits); for
    ``m`` below the smallest normal number (0 included) the scale of that number."""
    int_dtype, mask = _EXPONENT_BITS[m.dtype]
    m = m.clamp(min=torch.finfo(m.dtype).tiny)
    return torch.reciprocal((m.view(int_dtype) & mask).view(m.dtype))


def _largest(boxes: torch.Tensor) -> torch.Tensor:
    """The largest absolute coordinate of each box ``[..., 4] -> [...]`` (written out as three
    maxima when compiled: an elementwise expression fuses into the pass, a reduction would not)."""
    a = boxes.abs()
    if torch.compiler.is_compiling():
        return torch.maximum(torch.maximum(a[..., 0], a[..., 1]), torch.maximum(a[..., 2], a[..., 3]))
    return a.amax(-1)


def scale_pairs(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float):
    """``(boxes1 * s, boxes2 * s, Eps, s)``: each pair (``boxes1`` and ``boxes2`` broadcast against
    each other, ``[..., 4]``) times the power of two ``s [...]`` that brings its largest absolute
    coordinate into [1, 2), and ``eps`` scaled as each of its uses needs (:class:`Eps`). Scaling
    by a power of two is exact, so the IoU of every pair is the unscaled one bit for bit wherever
    the unscaled arithmetic neither overflows nor underflows; ``s`` carries no gradient."""
    with torch.no_grad():
        s = pair_scale(boxes1.detach(), boxes2.detach())
    scale = s.unsqueeze(-1)
    return boxes1 * scale, boxes2 * scale, scaled_eps(eps, s), s


def pair_scale(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """The power of two ``s [...]`` of :func:`scale_pairs` (no gradient: call under ``no_grad``)."""
    return inverse_power_of_two(torch.maximum(_largest(boxes1), _largest(boxes2)))


def scaled_eps(eps: float, s: torch.Tensor) -> Eps:
    """``eps`` in the units of pairs scaled by ``s`` (:class:`Eps`)."""
    eps_length = eps * s
    return Eps(eps_length, eps_length * s, eps)


def atan_ratio(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """atan(w / h) for h > 0; its limit (pi/2, or 0 for a point) where h <= 0, without NaN.

    Computed as ``atan2(w / m, h / m)`` with ``m = max(|w|, h)`` held constant (the angle does not
    depend on it): autograd's derivatives ``h / (w^2 + h^2)`` and ``-w / (w^2 + h^2)`` then see
    a vector of length 1 to sqrt(2) times ``1 / m``, so they are finite wherever the true
    derivative is. ``atan(w / h)`` itself would square ``w / h`` and ``h`` (w = 1, h = 3e-28:
    ``0 * inf`` = NaN)."""
    ok = h > 0
    h_ok = torch.where(ok, h, torch.ones_like(h))
    m = torch.maximum(w.abs(), h_ok).detach()
    r = torch.atan2(w / m, h_ok / m)
    # pi/2 in the computing dtype (a float32 constant would be off by 4e-8 in float64)
    return torch.where(ok, r, (w > 0).to(r.dtype) * (math.pi / 2))


def _relu0(d: torch.Tensor) -> torch.Tensor:
    """``d.clamp(0)`` whose derivative at exactly 0 is 0 (boxes that touch edge to edge get no
    gradient through the intersection), as ultralytics 8.4's ``bbox_iou`` gives under its torch."""
    return torch.where(d > 0, d, torch.zeros_like(d))


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    ok = den > 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def _corners(boxes: torch.Tensor, box_format: str) -> Tuple[torch.Tensor, ...]:
    """(x1, y1, x2, y2, w, h) from xyxy or cxcywh boxes."""
    if box_format == "xyxy":
        x1, y1, x2, y2 = boxes.unbind(-1)
        return x1, y1, x2, y2, x2 - x1, y2 - y1
    cx, cy, w, h = boxes.unbind(-1)
    w_, h_ = w / 2, h / 2
    return cx - w_, cy - h_, cx + w_, cy + h_, w, h


def _extra_penalty(kind, iou, cw, ch, dx, dy, w1, h1, w2, h2, eps: Eps):
    """EIoU and SIoU on shared quantities (enclosing size cw, ch; centre offset dx, dy)."""
    if kind == "eiou":
        # Zhang et al. 2021, eq. (EIoU): IoU - rho^2(b, b_gt)/c^2 - (w - w_gt)^2/cw^2 - (h - h_gt)^2/ch^2
        c2 = cw ** 2 + ch ** 2 + eps.area
        return iou - ((dx ** 2 + dy ** 2) / c2 + (w1 - w2) ** 2 / (cw ** 2 + eps.area)
                      + (h1 - h2) ** 2 / (ch ** 2 + eps.area))
    # SIoU, Gevorgyan 2022: angle cost Lambda = 1 - 2 sin^2(arcsin(|dy|/sigma) - pi/4), which equals
    # sin(2 alpha) = 2 |dx| |dy| / sigma^2 (this form has no infinite derivative at alpha = 90 deg);
    # distance cost Delta = sum_{x,y} 1 - exp(-(2 - Lambda) rho_t), rho_x = (dx/cw)^2, rho_y = (dy/ch)^2;
    # shape cost Omega = sum_{w,h} (1 - exp(-omega_t))^theta, omega_w = |w1 - w2| / max(w1, w2).
    sigma2 = dx ** 2 + dy ** 2 + eps.area
    angle = 2 * (dx * dy).abs() / sigma2
    gamma = 2 - angle
    rho_x = dx ** 2 / (cw ** 2 + eps.area)
    rho_y = dy ** 2 / (ch ** 2 + eps.area)
    distance = (1 - torch.exp(-gamma * rho_x)) + (1 - torch.exp(-gamma * rho_y))
    omega_w = (w1 - w2).abs() / (torch.maximum(w1, w2) + eps.length)
    omega_h = (h1 - h2).abs() / (torch.maximum(h1, h2) + eps.length)
    shape = (1 - torch.exp(-omega_w)) ** SIOU_THETA + (1 - torch.exp(-omega_h)) ** SIOU_THETA
    return iou - 0.5 * (distance + shape)


def _yolov5_iou(boxes1, boxes2, kind, box_format, eps: Eps):
    """YOLOv5 v7.0 / ultralytics ``bbox_iou``, term by term."""
    b1_x1, b1_y1, b1_x2, b1_y2, w1, h1 = _corners(boxes1, box_format)
    b2_x1, b2_y1, b2_x2, b2_y2, w2, h2 = _corners(boxes2, box_format)
    if box_format == "xyxy":
        h1, h2 = h1 + eps.length, h2 + eps.length
    inter = _relu0(torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)) * _relu0(
        torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)
    )
    union = w1 * h1 + w2 * h2 - inter  # + eps, which the originals add here and to c_area, cancels in
    iou = inter / (union + eps.area)   # c_area - union (written out: eps may be huge after scaling)
    if kind == "iou":
        return iou
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    if kind == "giou":
        c_area = cw * ch
        return iou - (c_area - union) / (c_area + eps.area)
    if kind in ("diou", "ciou"):
        c2 = cw ** 2 + ch ** 2 + eps.area
        rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
        if kind == "diou":
            return iou - rho2 / c2
        v = (4 / math.pi ** 2) * (atan_ratio(w2, h2) - atan_ratio(w1, h1)) ** 2
        with torch.no_grad():
            alpha = v / (v - iou + (1 + eps.unit))
        return iou - (rho2 / c2 + v * alpha)
    dx = (b2_x1 + b2_x2 - b1_x1 - b1_x2) / 2
    dy = (b2_y1 + b2_y2 - b1_y1 - b1_y2) / 2
    return _extra_penalty(kind, iou, cw, ch, dx, dy, w1, h1, w2, h2, eps)


def _torchvision_iou(boxes1, boxes2, kind, box_format, eps: Eps, pairwise=False):
    """torchvision.ops box-IoU losses (aligned) or matrices (``pairwise``), term by term."""
    x1, y1, x2, y2, w1, h1 = _corners(boxes1, box_format)
    x1g, y1g, x2g, y2g, w2, h2 = _corners(boxes2, box_format)
    xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
    if pairwise:  # torchvision's _box_inter_union
        inter = (xkis2 - xkis1).clamp(min=0) * (ykis2 - ykis1).clamp(min=0)
    else:  # torchvision's _loss_inter_union
        mask = (ykis2 > ykis1) & (xkis2 > xkis1)
        inter = torch.where(mask, (xkis2 - xkis1) * (ykis2 - ykis1), torch.zeros_like(xkis1))
    union = w1 * h1 + w2 * h2 - inter
    iou = _safe_div(inter, union) if pairwise else inter / (union + eps.area)
    if kind == "iou":
        return iou
    xc1, yc1 = torch.min(x1, x1g), torch.min(y1, y1g)
    xc2, yc2 = torch.max(x2, x2g), torch.max(y2, y2g)
    cw, ch = xc2 - xc1, yc2 - yc1
    if kind == "giou":
        area_c = cw * ch
        penalty = _safe_div(area_c - union, area_c) if pairwise else (area_c - union) / (area_c + eps.area)
        return iou - penalty
    dx = (x2 + x1) / 2 - (x1g + x2g) / 2
    dy = (y2 + y1) / 2 - (y1g + y2g) / 2
    if kind in ("diou", "ciou"):
        diou = iou - (dx ** 2 + dy ** 2) / (cw ** 2 + ch ** 2 + eps.area)
        if kind == "diou":
            return diou
        v = (4 / (torch.pi ** 2)) * (atan_ratio(w2, h2) - atan_ratio(w1, h1)) ** 2
        with torch.no_grad():
            alpha = v / (1 - iou + v + eps.unit)
        return diou - alpha * v
    return _extra_penalty(kind, iou, cw, ch, dx, dy, w1, h1, w2, h2, eps)


def box_iou_formula(boxes1, boxes2, kind="iou", box_format="xyxy", convention="torchvision", eps=1e-7,
                    pairwise=False):
    """IoU-kind of the pairs of ``boxes1`` and ``boxes2`` (broadcast against each other, ``[..., 4]``).

    ``pairwise`` selects torchvision's matrix functions (no eps on the union or the enclosing
    area, a zero union giving 0) for kind iou / giou / diou / ciou; the yolov5 convention has one
    form for both."""
    b1, b2, scaled_eps, _ = scale_pairs(boxes1, boxes2, eps)
    if convention == "yolov5":
        return _yolov5_iou(b1, b2, kind, box_format, scaled_eps)
    return _torchvision_iou(b1, b2, kind, box_format, scaled_eps, pairwise=pairwise and kind in KINDS[:4])


def iou_loss_formula(pred, target, kind="giou", box_format="xyxy", convention="torchvision", eps=1e-7):
    """``1 - IoU_kind(pred, target)`` of aligned pairs, elementwise ``[...]``."""
    return 1 - box_iou_formula(pred, target, kind=kind, box_format=box_format, convention=convention, eps=eps)
