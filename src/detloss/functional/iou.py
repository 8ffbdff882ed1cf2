"""IoU family for boxes: IoU, GIoU, DIoU, CIoU, EIoU, SIoU, as values and as losses.

Two conventions, each reproducing its original to the last digit that matters:

* ``"torchvision"``: torchvision.ops ``generalized_box_iou_loss``, ``distance_box_iou_loss``,
  ``complete_box_iou_loss`` (aligned pairs; eps=1e-7 added to the union, the enclosing area and
  the enclosing diagonal; the intersection counts only where it is strictly positive; CIoU's
  alpha = v / (1 - IoU + v + eps) without gradient) and ``box_iou`` / ``generalized_box_iou``,
  ``distance_box_iou``, ``complete_box_iou`` (pairwise matrices; no eps on the union).
* ``"yolov5"``: YOLOv5 v7.0 ``utils/metrics.py`` ``bbox_iou`` (identical to ultralytics'
  ``bbox_iou``): with xyxy input eps is added to both heights, always to the union, the
  enclosing area and the enclosing diagonal; CIoU's alpha = v / (v - IoU + 1 + eps) without
  gradient.

Papers: GIoU, Rezatofighi et al. 2019 (arXiv:1902.09630); DIoU/CIoU, Zheng et al. 2020
(arXiv:1911.08287); EIoU, Zhang et al. 2021, "Focal and Efficient IOU Loss" (arXiv:2101.08158);
SIoU, Gevorgyan 2022, "SIoU Loss: More Powerful Learning for Bounding Box Regression"
(arXiv:2205.12740).
"""
from __future__ import annotations

import math
from typing import Tuple

import torch

from .. import kernels
from .._checks import check_choice, check_floating, check_reduction, compute_dtype, upcast
from ._common import first_bad, reduce

__all__ = ["aligned_box_iou", "box_iou", "pairwise_box_iou", "iou_loss", "KINDS", "CONVENTIONS", "BOX_FORMATS"]

KINDS = ("iou", "giou", "diou", "ciou", "eiou", "siou")
CONVENTIONS = ("torchvision", "yolov5")
BOX_FORMATS = ("xyxy", "cxcywh")
#: SIoU's shape-cost exponent theta (Gevorgyan 2022 uses 4).
SIOU_THETA = 4.0


def _check_boxes(name: str, boxes: object, box_format: str, validate: bool = True) -> torch.Tensor:
    t = check_floating(name, boxes)
    if t.dim() == 0 or t.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape [..., 4], got {tuple(t.shape)}")
    if validate and t.numel():
        d = t.detach()
        if box_format == "xyxy":
            bad = (d[..., 2] < d[..., 0]) | (d[..., 3] < d[..., 1])
            rule = "x2 >= x1 and y2 >= y1 (xyxy)"
        else:
            bad = (d[..., 2] < 0) | (d[..., 3] < 0)
            rule = "w >= 0 and h >= 0 (cxcywh)"
        if bool(bad.any()):
            pos = first_bad(bad)
            raise ValueError(f"{name}: expected boxes with {rule}, got {d[pos].tolist()} at row {pos}")
    return t


def _check_args(kind: str, box_format: str, convention: str) -> None:
    check_choice("kind", kind, KINDS)
    check_choice("box_format", box_format, BOX_FORMATS)
    check_choice("convention", convention, CONVENTIONS)


def _atan_ratio(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """atan(w / h) for h > 0; its limit (pi/2, or 0 for a point) where h == 0, without NaN."""
    ok = h > 0
    r = torch.atan(w / torch.where(ok, h, torch.ones_like(h)))
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


def _extra_penalty(kind, iou, cw, ch, dx, dy, w1, h1, w2, h2, eps):
    """EIoU and SIoU on shared quantities (enclosing size cw, ch; centre offset dx, dy)."""
    if kind == "eiou":
        # Zhang et al. 2021, eq. (EIoU): IoU - rho^2(b, b_gt)/c^2 - (w - w_gt)^2/cw^2 - (h - h_gt)^2/ch^2
        c2 = cw ** 2 + ch ** 2 + eps
        return iou - ((dx ** 2 + dy ** 2) / c2 + (w1 - w2) ** 2 / (cw ** 2 + eps) + (h1 - h2) ** 2 / (ch ** 2 + eps))
    # SIoU, Gevorgyan 2022: angle cost Lambda = 1 - 2 sin^2(arcsin(|dy|/sigma) - pi/4), which equals
    # sin(2 alpha) = 2 |dx| |dy| / sigma^2 (this form has no infinite derivative at alpha = 90 deg);
    # distance cost Delta = sum_{x,y} 1 - exp(-(2 - Lambda) rho_t), rho_x = (dx/cw)^2, rho_y = (dy/ch)^2;
    # shape cost Omega = sum_{w,h} (1 - exp(-omega_t))^theta, omega_w = |w1 - w2| / max(w1, w2).
    sigma2 = dx ** 2 + dy ** 2 + eps
    angle = 2 * (dx * dy).abs() / sigma2
    gamma = 2 - angle
    rho_x = dx ** 2 / (cw ** 2 + eps)
    rho_y = dy ** 2 / (ch ** 2 + eps)
    distance = (1 - torch.exp(-gamma * rho_x)) + (1 - torch.exp(-gamma * rho_y))
    omega_w = (w1 - w2).abs() / (torch.maximum(w1, w2) + eps)
    omega_h = (h1 - h2).abs() / (torch.maximum(h1, h2) + eps)
    shape = (1 - torch.exp(-omega_w)) ** SIOU_THETA + (1 - torch.exp(-omega_h)) ** SIOU_THETA
    return iou - 0.5 * (distance + shape)


def _yolov5_iou(boxes1, boxes2, kind, box_format, eps):
    """YOLOv5 v7.0 / ultralytics ``bbox_iou``, term by term."""
    b1_x1, b1_y1, b1_x2, b1_y2, w1, h1 = _corners(boxes1, box_format)
    b2_x1, b2_y1, b2_x2, b2_y2, w2, h2 = _corners(boxes2, box_format)
    if box_format == "xyxy":
        h1, h2 = h1 + eps, h2 + eps
    inter = _relu0(torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)) * _relu0(
        torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)
    )
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if kind == "iou":
        return iou
    cw = torch.max(b1_x2, b2_x2) - torch.min(b1_x1, b2_x1)
    ch = torch.max(b1_y2, b2_y2) - torch.min(b1_y1, b2_y1)
    if kind == "giou":
        c_area = cw * ch + eps
        return iou - (c_area - union) / c_area
    if kind in ("diou", "ciou"):
        c2 = cw ** 2 + ch ** 2 + eps
        rho2 = ((b2_x1 + b2_x2 - b1_x1 - b1_x2) ** 2 + (b2_y1 + b2_y2 - b1_y1 - b1_y2) ** 2) / 4
        if kind == "diou":
            return iou - rho2 / c2
        v = (4 / math.pi ** 2) * (_atan_ratio(w2, h2) - _atan_ratio(w1, h1)) ** 2
        with torch.no_grad():
            alpha = v / (v - iou + (1 + eps))
        return iou - (rho2 / c2 + v * alpha)
    dx = (b2_x1 + b2_x2 - b1_x1 - b1_x2) / 2
    dy = (b2_y1 + b2_y2 - b1_y1 - b1_y2) / 2
    return _extra_penalty(kind, iou, cw, ch, dx, dy, w1, h1, w2, h2, eps)


def _torchvision_iou(boxes1, boxes2, kind, box_format, eps, pairwise=False):
    """torchvision.ops box-IoU losses (aligned) or matrices (``pairwise``), term by term."""
    x1, y1, x2, y2, w1, h1 = _corners(boxes1, box_format)
    x1g, y1g, x2g, y2g, w2, h2 = _corners(boxes2, box_format)
    if box_format == "xyxy":
        w1, h1, w2, h2 = x2 - x1, y2 - y1, x2g - x1g, y2g - y1g
    xkis1, ykis1 = torch.max(x1, x1g), torch.max(y1, y1g)
    xkis2, ykis2 = torch.min(x2, x2g), torch.min(y2, y2g)
    if pairwise:  # torchvision's _box_inter_union
        inter = (xkis2 - xkis1).clamp(min=0) * (ykis2 - ykis1).clamp(min=0)
    else:  # torchvision's _loss_inter_union
        mask = (ykis2 > ykis1) & (xkis2 > xkis1)
        inter = torch.where(mask, (xkis2 - xkis1) * (ykis2 - ykis1), torch.zeros_like(xkis1))
    union = w1 * h1 + w2 * h2 - inter
    iou = _safe_div(inter, union) if pairwise else inter / (union + eps)
    if kind == "iou":
        return iou
    xc1, yc1 = torch.min(x1, x1g), torch.min(y1, y1g)
    xc2, yc2 = torch.max(x2, x2g), torch.max(y2, y2g)
    cw, ch = xc2 - xc1, yc2 - yc1
    if kind == "giou":
        area_c = cw * ch
        penalty = _safe_div(area_c - union, area_c) if pairwise else (area_c - union) / (area_c + eps)
        return iou - penalty
    dx = (x2 + x1) / 2 - (x1g + x2g) / 2
    dy = (y2 + y1) / 2 - (y1g + y2g) / 2
    if kind in ("diou", "ciou"):
        diou = iou - (dx ** 2 + dy ** 2) / (cw ** 2 + ch ** 2 + eps)
        if kind == "diou":
            return diou
        v = (4 / (torch.pi ** 2)) * (_atan_ratio(w2, h2) - _atan_ratio(w1, h1)) ** 2
        with torch.no_grad():
            alpha = v / (1 - iou + v + eps)
        return diou - alpha * v
    return _extra_penalty(kind, iou, cw, ch, dx, dy, w1, h1, w2, h2, eps)


def _box_iou_formula(boxes1, boxes2, kind="iou", box_format="xyxy", convention="torchvision", eps=1e-7):
    """Eager formula of :func:`aligned_box_iou` (validated tensors in the compute dtype)."""
    if convention == "yolov5":
        return _yolov5_iou(boxes1, boxes2, kind, box_format, eps)
    return _torchvision_iou(boxes1, boxes2, kind, box_format, eps)


def _prepare(name1, boxes1, name2, boxes2, kind, box_format, convention, eps, validate=True):
    _check_args(kind, box_format, convention)
    _check_boxes(name1, boxes1, box_format, validate)
    _check_boxes(name2, boxes2, box_format, validate)
    if not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")
    dtype = compute_dtype(boxes1, boxes2)
    return upcast(boxes1, dtype), upcast(boxes2, dtype)


def aligned_box_iou(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    *,
    kind: str = "iou",
    box_format: str = "xyxy",
    convention: str = "torchvision",
    eps: float = 1e-7,
    validate: bool = True,
) -> torch.Tensor:
    r"""IoU-kind of aligned box pairs: ``[..., 4]`` and ``[..., 4]`` (same shape) give ``[...]``
    (pair ``i`` of ``boxes1`` with pair ``i`` of ``boxes2``; for every pair use :func:`pairwise_box_iou`).

    .. math::
        \mathrm{IoU} = \frac{|A \cap B|}{|A \cup B|},\quad
        \mathrm{GIoU} = \mathrm{IoU} - \frac{|C| - |A \cup B|}{|C|},\quad
        \mathrm{DIoU} = \mathrm{IoU} - \frac{\rho^2}{c^2},\quad
        \mathrm{CIoU} = \mathrm{DIoU} - \alpha v

    with :math:`C` the smallest enclosing box, :math:`c` its diagonal, :math:`\rho` the distance
    of the centres, :math:`v = \frac{4}{\pi^2}(\arctan\frac{w_2}{h_2} - \arctan\frac{w_1}{h_1})^2`
    and :math:`\alpha = v / (1 - \mathrm{IoU} + v)` (no gradient). EIoU:
    :math:`\mathrm{IoU} - \rho^2/c^2 - (w_1 - w_2)^2/C_w^2 - (h_1 - h_2)^2/C_h^2` (Zhang et al.
    2021). SIoU: :math:`\mathrm{IoU} - (\Delta + \Omega)/2` with the angle-aware distance cost
    :math:`\Delta` and shape cost :math:`\Omega` (theta = 4) of Gevorgyan 2022.
    Where eps goes is set by ``convention`` (see the module docstring).

    Boxes must have non-negative sizes (``x2 >= x1``, ``y2 >= y1``; ``w, h >= 0``): this function,
    :func:`pairwise_box_iou` and :func:`iou_loss` raise ValueError otherwise. ``validate=False``
    skips that check (and its device synchronization) for callers whose boxes may legitimately
    be inverted, such as decoded predictions before a head's ReLU (FCOS): the same formula is
    then applied to them as the originals do; shapes, dtypes and arguments are still checked.
    """
    b1, b2 = _prepare("boxes1", boxes1, "boxes2", boxes2, kind, box_format, convention, eps, validate)
    if boxes1.shape != boxes2.shape:
        raise ValueError(
            f"boxes2: expected the same shape as boxes1 {tuple(boxes1.shape)} (aligned pairs; "
            f"use pairwise_box_iou for all pairs), got {tuple(boxes2.shape)}"
        )
    return _box_iou_formula(b1, b2, kind=kind, box_format=box_format, convention=convention, eps=eps)


def pairwise_box_iou(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    *,
    kind: str = "iou",
    box_format: str = "xyxy",
    convention: str = "torchvision",
    eps: float = 1e-7,
    validate: bool = True,
) -> torch.Tensor:
    r"""IoU-kind of every pair: ``boxes1 [N, 4]`` x ``boxes2 [M, 4]`` -> ``[N, M]``; batches of
    matrices ``[..., N, 4]`` x ``[..., M, 4]`` with equal batch dims give ``[..., N, M]``.

    The formulas are those of :func:`aligned_box_iou`. With ``convention="torchvision"`` it reproduces
    ``torchvision.ops.box_iou`` / ``generalized_box_iou`` / ``distance_box_iou`` /
    ``complete_box_iou``: no eps on the union or the enclosing area (a pair with zero union gives
    0 instead of NaN); with ``"yolov5"`` it is ``bbox_iou`` on every pair.
    """
    b1, b2 = _prepare("boxes1", boxes1, "boxes2", boxes2, kind, box_format, convention, eps, validate)
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        if b.dim() < 2:
            raise ValueError(f"{name}: expected a matrix of boxes [N, 4] (or a batch [..., N, 4]), got {tuple(b.shape)}")
    if boxes1.shape[:-2] != boxes2.shape[:-2]:
        raise ValueError(
            f"boxes1: expected a matrix of boxes [N, 4], or a batch [..., N, 4] with the batch dims of boxes2 "
            f"{tuple(boxes2.shape[:-2])}, got {tuple(boxes1.shape)}"
        )
    b1, b2 = b1[..., :, None, :], b2[..., None, :, :]
    if convention == "yolov5":
        return _yolov5_iou(b1, b2, kind, box_format, eps)
    return _torchvision_iou(b1, b2, kind, box_format, eps, pairwise=kind in ("iou", "giou", "diou", "ciou"))


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every pair, ``boxes1 [N, 4]`` x ``boxes2 [M, 4]`` (xyxy) -> ``[N, M]``: the meaning
    and the numbers of ``torchvision.ops.box_iou``. Same as ``pairwise_box_iou(boxes1, boxes2)``;
    the IoU of aligned pairs is :func:`aligned_box_iou`."""
    return pairwise_box_iou(boxes1, boxes2)


def _iou_loss_formula(
    pred, target, kind="giou", box_format="xyxy", convention="torchvision", reduction="none", eps=1e-7
):
    """Eager formula of :func:`iou_loss` (validated tensors in the compute dtype)."""
    value = _box_iou_formula(pred, target, kind=kind, box_format=box_format, convention=convention, eps=eps)
    return reduce(1 - value, reduction)


def iou_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    kind: str = "giou",
    box_format: str = "xyxy",
    convention: str = "torchvision",
    reduction: str = "none",
    eps: float = 1e-7,
    validate: bool = True,
) -> torch.Tensor:
    r"""Box regression loss :math:`1 - \mathrm{IoU}_{kind}(pred, target)` on aligned pairs ``[..., 4]``.

    ``convention="torchvision"`` with kind giou / diou / ciou is exactly
    ``torchvision.ops.generalized_box_iou_loss`` / ``distance_box_iou_loss`` /
    ``complete_box_iou_loss`` (eps=1e-7, reduction "none" by default, the mean of nothing is 0);
    ``convention="yolov5"`` is ``1 - bbox_iou(...)`` of YOLOv5 v7.0 / ultralytics. See
    :func:`aligned_box_iou` for the formulas and the sources; negative box sizes raise ValueError.
    """
    check_reduction(reduction)
    p, t = _prepare("pred", pred, "target", target, kind, box_format, convention, eps, validate)
    if pred.shape != target.shape:
        raise ValueError(
            f"target: expected the same shape as pred {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    if kind in kernels.FUSED_IOU_KINDS and kernels.use_fused(pred, target):
        return kernels.fused_iou_loss(pred, target, kind, box_format, convention, reduction, eps)
    return _iou_loss_formula(p, t, kind=kind, box_format=box_format, convention=convention,
                             reduction=reduction, eps=eps)
