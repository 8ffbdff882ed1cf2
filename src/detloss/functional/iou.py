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

The formulas are in :mod:`detloss.kernels.iou_formula` (which also serves the fused box losses);
this module checks the arguments. Each pair is computed at a power-of-two scale that keeps its
areas and squared distances inside the floating-point range, so float32 boxes with coordinates of
1e20 or sides of 1e-20 give finite values and gradients, and every other pair the same numbers as
unscaled.

Papers: GIoU, Rezatofighi et al. 2019 (arXiv:1902.09630); DIoU/CIoU, Zheng et al. 2020
(arXiv:1911.08287); EIoU, Zhang et al. 2021, "Focal and Efficient IOU Loss" (arXiv:2101.08158);
SIoU, Gevorgyan 2022, "SIoU Loss: More Powerful Learning for Bounding Box Regression"
(arXiv:2205.12740).
"""
from __future__ import annotations

import torch

from .. import kernels
from .._checks import check_choice, check_floating, check_reduction, compute_dtype, upcast
from ..kernels.iou_formula import BOX_FORMATS, CONVENTIONS, KINDS, SIOU_THETA, box_iou_formula, iou_loss_formula
from ._common import first_bad, reduce, values

__all__ = ["aligned_box_iou", "box_iou", "pairwise_box_iou", "iou_loss", "KINDS", "CONVENTIONS", "BOX_FORMATS",
           "SIOU_THETA"]


def _check_boxes(name: str, boxes: object, box_format: str, validate: bool = True) -> torch.Tensor:
    t = check_floating(name, boxes)
    if t.dim() == 0 or t.shape[-1] != 4:
        raise ValueError(f"{name}: expected boxes of shape [..., 4], got {tuple(t.shape)}")
    if validate and t.numel():
        d = values(t)
        # (x2 < x1, y2 < y1) in one op, into a [2, ...] mask: the comparison then runs along the
        # boxes (stride 4) instead of over rows of two
        hi = d[..., 2:].movedim(-1, 0)
        bad = torch.empty(hi.shape, dtype=torch.bool, device=d.device)
        if box_format == "xyxy":
            torch.lt(hi, d[..., :2].movedim(-1, 0), out=bad)
            rule = "x2 >= x1 and y2 >= y1 (xyxy)"
        else:
            torch.lt(hi, 0, out=bad)
            rule = "w >= 0 and h >= 0 (cxcywh)"
        if bool(bad.any()):
            pos = first_bad(bad.any(0))
            raise ValueError(f"{name}: expected boxes with {rule}, got {d[pos].tolist()} at row {pos}")
    return t


def _check_args(kind: str, box_format: str, convention: str) -> None:
    check_choice("kind", kind, KINDS)
    check_choice("box_format", box_format, BOX_FORMATS)
    check_choice("convention", convention, CONVENTIONS)


def _box_iou_formula(boxes1, boxes2, kind="iou", box_format="xyxy", convention="torchvision", eps=1e-7):
    """The formula of :func:`aligned_box_iou` (validated tensors in the compute dtype)."""
    return box_iou_formula(boxes1, boxes2, kind=kind, box_format=box_format, convention=convention, eps=eps)


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
    then applied to them as the originals do (the fused path of :func:`iou_loss` included);
    shapes, dtypes and arguments are still checked. Values are finite for any finite boxes
    (each pair is computed at a power-of-two scale, see the module docstring).
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
    return box_iou_formula(b1[..., :, None, :], b2[..., None, :, :], kind=kind, box_format=box_format,
                           convention=convention, eps=eps, pairwise=True)


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor) -> torch.Tensor:
    """IoU of every pair, ``boxes1 [N, 4]`` x ``boxes2 [M, 4]`` (xyxy) -> ``[N, M]``: the meaning
    and the numbers of ``torchvision.ops.box_iou``. Same as ``pairwise_box_iou(boxes1, boxes2)``;
    the IoU of aligned pairs is :func:`aligned_box_iou`."""
    return pairwise_box_iou(boxes1, boxes2)


def _iou_loss_formula(
    pred, target, kind="giou", box_format="xyxy", convention="torchvision", reduction="none", eps=1e-7
):
    """The formula of :func:`iou_loss` (validated tensors in the compute dtype), autograd throughout."""
    loss = iou_loss_formula(pred, target, kind=kind, box_format=box_format, convention=convention, eps=eps)
    return reduce(loss, reduction)


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
    :func:`aligned_box_iou` for the formulas and the sources; negative box sizes raise ValueError
    unless ``validate=False``. Kinds iou / giou / diou / ciou run the closed-form pass of
    :mod:`detloss.kernels` (compiled for large inputs), EIoU and SIoU the formula.
    """
    check_reduction(reduction)
    p, t = _prepare("pred", pred, "target", target, kind, box_format, convention, eps, validate)
    if pred.shape != target.shape:
        raise ValueError(
            f"target: expected the same shape as pred {tuple(pred.shape)}, got {tuple(target.shape)}"
        )
    if kind in kernels.FUSED_IOU_KINDS:
        return kernels.fused_iou_loss(pred, target, kind, box_format, convention, reduction, eps,
                                      compiled=kernels.use_fused(pred, target))
    return _iou_loss_formula(p, t, kind=kind, box_format=box_format, convention=convention,
                             reduction=reduction, eps=eps)
