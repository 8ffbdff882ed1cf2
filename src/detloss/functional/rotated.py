"""Rotated boxes: conversions, ProbIoU and its loss, and the OBB angle loss.

Rotated boxes are ``xywhr``: centre ``(x, y)``, width ``w``, height ``h`` and the rotation ``r``
in radians (counter-clockwise in image coordinates, x right and y down, as ultralytics' OBB
datasets give it; ultralytics' labels lie in ``[0, pi/2)``).

References:
    Llerena et al. 2021, "Gaussian Bounding Boxes and Probabilistic Intersection-over-Union for
    Object Detection" (arXiv:2106.06072): a box is the Gaussian N(centre, Sigma) with
    Sigma = R diag(w^2 / 12, h^2 / 12) R^T; ProbIoU = 1 - Hellinger distance, from the
    Bhattacharyya distance.
    ultralytics 8.4 ``utils/metrics.py`` (``_get_covariance_matrix``, ``probiou``: eps 1e-7, the
    variance floor), ``utils/tal.py`` (``dist2rbox``, ``rbox2dist``), ``utils/ops.py``
    (``xywhr2xyxyxyxy``) and ``utils/loss.py`` (``RotatedBboxLoss`` with floor 0.01,
    ``v8OBBLoss.calculate_angle_loss``).
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .._checks import check_broadcastable_to, check_floating, check_reduction, check_same_shape, compute_dtype, upcast
from ._common import check_in_range, first_bad, reduce

__all__ = [
    "xywhr_to_corners",
    "rbox_covariance",
    "probiou",
    "probiou_loss",
    "dist_to_rbox",
    "rbox_to_dist",
    "rotated_angle_loss",
    "PROBIOU_LOSS_FLOOR",
]

#: Variance added to ``w^2 / 12`` and ``h^2 / 12`` in the box loss (ultralytics ``RotatedBboxLoss.floor``):
#: it bounds the gradient of boxes much smaller than a grid cell.
PROBIOU_LOSS_FLOOR = 0.01
#: The Bhattacharyya distance is clamped to [eps, BD_MAX] (ultralytics ``probiou``).
BD_MAX = 100.0


def _check_rboxes(name: str, boxes: object, validate: bool = True) -> torch.Tensor:
    t = check_floating(name, boxes)
    if t.dim() < 1 or t.shape[-1] != 5:
        raise ValueError(f"{name}: expected rotated boxes of shape [..., 5] (x, y, w, h, angle), got {tuple(t.shape)}")
    if validate and t.numel():
        d = t.detach()
        bad = ~torch.isfinite(d).all(-1) | (d[..., 2] < 0) | (d[..., 3] < 0)
        if bool(bad.any()):
            pos = first_bad(bad)
            raise ValueError(
                f"{name}: expected finite rotated boxes with w >= 0 and h >= 0, got {d[pos].tolist()} at row {pos}"
            )
    return t


def _check_weight(weight: Optional[torch.Tensor], shape: torch.Size) -> None:
    if weight is not None:
        check_floating("weight", weight)
        check_broadcastable_to("weight", weight, shape, "the loss")


def xywhr_to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """Corners ``[..., 4, 2]`` of ``xywhr`` boxes ``[..., 5]``, in the order centre + u + v,
    centre + u - v, centre - u - v, centre - u + v with ``u = w/2 (cos r, sin r)`` and
    ``v = h/2 (-sin r, cos r)`` (ultralytics ``xywhr2xyxyxyxy``)."""
    _check_rboxes("boxes", boxes, validate=False)
    ctr = boxes[..., :2]
    w, h, r = boxes[..., 2:3], boxes[..., 3:4], boxes[..., 4:5]
    cos, sin = torch.cos(r), torch.sin(r)
    u = torch.cat((w / 2 * cos, w / 2 * sin), -1)
    v = torch.cat((-h / 2 * sin, h / 2 * cos), -1)
    return torch.stack((ctr + u + v, ctr + u - v, ctr - u - v, ctr - u + v), -2)


def rbox_covariance(boxes: torch.Tensor, *, floor: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""Covariance ``[[a, c], [c, b]]`` of the Gaussian of ``xywhr`` boxes ``[..., 5]``; each of
    ``a, b, c`` has shape ``[...]``.

    .. math:: a = \sigma_w \cos^2 r + \sigma_h \sin^2 r,\quad b = \sigma_w \sin^2 r + \sigma_h \cos^2 r,
              \quad c = (\sigma_w - \sigma_h) \cos r \sin r,\qquad \sigma_{w,h} = w^2 / 12 + floor, h^2 / 12 + floor

    (the variance of a uniform distribution over the box, plus the variance floor).
    """
    sw = boxes[..., 2].pow(2) / 12 + floor
    sh = boxes[..., 3].pow(2) / 12 + floor
    r = boxes[..., 4]
    cos, sin = r.cos(), r.sin()
    cos2, sin2 = cos.pow(2), sin.pow(2)
    return sw * cos2 + sh * sin2, sw * sin2 + sh * cos2, (sw - sh) * cos * sin


def _sqrt_pos(x: torch.Tensor) -> torch.Tensor:
    """``sqrt(x)`` for ``x >= 0`` whose derivative at ``x = 0`` is 0 instead of inf (degenerate boxes)."""
    pos = x > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, x, torch.ones_like(x))), torch.zeros_like(x))


def _probiou_formula(b1: torch.Tensor, b2: torch.Tensor, eps: float, floor: float) -> torch.Tensor:
    x1, y1 = b1[..., 0], b1[..., 1]
    x2, y2 = b2[..., 0], b2[..., 1]
    a1, bb1, c1 = rbox_covariance(b1, floor=floor)
    a2, bb2, c2 = rbox_covariance(b2, floor=floor)
    sa, sb, sc = a1 + a2, bb1 + bb2, c1 + c2
    det = sa * sb - sc.pow(2)
    t1 = ((sa * (y1 - y2).pow(2) + sb * (x1 - x2).pow(2)) / (det + eps)) * 0.25
    t2 = ((sc * (x2 - x1) * (y1 - y2)) / (det + eps)) * 0.5
    det1 = (a1 * bb1 - c1.pow(2)).clamp(min=0)
    det2 = (a2 * bb2 - c2.pow(2)).clamp(min=0)
    t3 = (det / (4 * _sqrt_pos(det1 * det2) + eps) + eps).log() * 0.5
    bd = (t1 + t2 + t3).clamp(eps, BD_MAX)
    hd = torch.sqrt(1.0 - (-bd).exp() + eps)
    return 1 - hd


def probiou(
    boxes1: torch.Tensor,
    boxes2: torch.Tensor,
    *,
    eps: float = 1e-7,
    floor: float = 0.0,
    validate: bool = True,
) -> torch.Tensor:
    r"""ProbIoU of aligned pairs of rotated boxes ``[..., 5]`` (``xywhr``) -> ``[...]``.

    With :math:`\Sigma_i` from :func:`rbox_covariance` (``floor`` added to both variances),
    :math:`\Sigma = \Sigma_1 + \Sigma_2 = [[A, C], [C, B]]` and :math:`\Delta = \mu_1 - \mu_2`:

    .. math::
        B_D = \frac{A \Delta_y^2 + B \Delta_x^2}{4 (|\Sigma| + \epsilon)}
              - \frac{C \Delta_x \Delta_y}{2 (|\Sigma| + \epsilon)}
              + \frac12 \log\Bigl(\frac{|\Sigma|}{4 \sqrt{|\Sigma_1| |\Sigma_2|} + \epsilon} + \epsilon\Bigr),
        \qquad \mathrm{ProbIoU} = 1 - \sqrt{1 - e^{-\mathrm{clamp}(B_D, \epsilon, 100)} + \epsilon}

    (Bhattacharyya distance of the two Gaussians, Hellinger distance; Llerena et al. 2021,
    exactly as ultralytics 8.4 ``probiou``, whose defaults eps=1e-7 and floor=0 these are; the
    OBB box loss uses floor 0.01). Symmetric in its arguments; 1 - 1e-7 ** 0.5 for identical
    boxes. Finite for zero-size boxes (``validate`` checks ``w, h >= 0`` and finite values).
    """
    _check_rboxes("boxes1", boxes1, validate)
    _check_rboxes("boxes2", boxes2, validate)
    check_same_shape("boxes1", boxes1, "boxes2", boxes2)
    if not eps > 0:
        raise ValueError(f"eps: expected a positive number, got {eps!r}")
    if not floor >= 0:
        raise ValueError(f"floor: expected a number >= 0, got {floor!r}")
    dt = compute_dtype(boxes1, boxes2)
    return _probiou_formula(upcast(boxes1, dt), upcast(boxes2, dt), eps, floor)


def probiou_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    floor: float = PROBIOU_LOSS_FLOOR,
    eps: float = 1e-7,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "none",
    validate: bool = True,
) -> torch.Tensor:
    r"""Rotated-box regression loss :math:`w (1 - \mathrm{ProbIoU}(target, pred))` on aligned pairs
    ``[..., 5]`` (see :func:`probiou`), with the variance floor 0.01 of ultralytics 8.4
    ``RotatedBboxLoss`` by default. ``weight`` (optional) broadcasts to ``[...]``."""
    check_reduction(reduction)
    _check_rboxes("pred", pred, validate)
    _check_rboxes("target", target, validate)
    check_same_shape("pred", pred, "target", target)
    _check_weight(weight, pred.shape[:-1])
    loss = 1.0 - probiou(pred, target, eps=eps, floor=floor, validate=False)
    if weight is not None:
        loss = loss * upcast(weight, loss.dtype)
    return reduce(loss, reduction)


def dist_to_rbox(distances: torch.Tensor, angle: torch.Tensor, *, anchor_points: torch.Tensor) -> torch.Tensor:
    r"""Rotated boxes ``(x, y, w, h)`` ``[..., 4]`` from distances ``(l, t, r, b)`` ``[..., 4]`` to
    the sides of a box rotated by ``angle`` ``[..., 1]`` about ``anchor_points`` ``[..., 2]``
    (broadcasting): the centre is the anchor plus the rotated offset ``((r - l) / 2, (b - t) / 2)``,
    ``w = l + r``, ``h = t + b`` (ultralytics ``dist2rbox``; units of the anchor points)."""
    lt, rb = distances.split(2, dim=-1)
    cos, sin = torch.cos(angle), torch.sin(angle)
    xf, yf = ((rb - lt) / 2).split(1, dim=-1)
    xy = torch.cat((xf * cos - yf * sin, xf * sin + yf * cos), -1) + anchor_points
    return torch.cat((xy, lt + rb), -1)


def rbox_to_dist(boxes: torch.Tensor, *, anchor_points: torch.Tensor, max_dist: Optional[float] = None) -> torch.Tensor:
    """Distances ``(l, t, r, b)`` ``[..., 4]`` from ``anchor_points`` ``[..., 2]`` to the sides of the
    ``xywhr`` boxes ``[..., 5]``, measured along the box's own axes; the inverse of
    :func:`dist_to_rbox` (ultralytics ``rbox2dist``). ``max_dist`` clamps them to ``[0, max_dist]``."""
    offset = boxes[..., :2] - anchor_points
    ox, oy = offset.split(1, dim=-1)
    r = boxes[..., 4:5]
    cos, sin = torch.cos(r), torch.sin(r)
    xf = ox * cos + oy * sin
    yf = -ox * sin + oy * cos
    w, h = boxes[..., 2:3], boxes[..., 3:4]
    dist = torch.cat((w / 2 - xf, h / 2 - yf, w / 2 + xf, h / 2 + yf), -1)
    return dist if max_dist is None else dist.clamp(0, max_dist)


def rotated_angle_loss(
    pred_angle: torch.Tensor,
    target_angle: torch.Tensor,
    *,
    target_wh: torch.Tensor,
    aspect_lambda: float = 3.0,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "none",
) -> torch.Tensor:
    r"""Angle loss of ultralytics 8.4 ``v8OBBLoss.calculate_angle_loss``: periodic in pi, damped
    for near-square targets whose angle is ill-defined.

    .. math:: \ell = w\,\exp\Bigl(-\frac{\log^2\frac{w_t + 10^{-9}}{h_t + 10^{-9}}}{\lambda^2}\Bigr)
              \sin^2\bigl(2 (\delta - \mathrm{round}(\delta / \pi)\,\pi)\bigr),\qquad \delta = r_{pred} - r_{target}

    ``pred_angle`` and ``target_angle`` ``[...]`` in radians, ``target_wh`` ``[..., 2]`` the
    target's width and height (positive), ``aspect_lambda`` = ultralytics' ``lambda_val`` (3).
    """
    check_floating("pred_angle", pred_angle)
    check_floating("target_angle", target_angle)
    check_floating("target_wh", target_wh)
    check_reduction(reduction)
    check_same_shape("pred_angle", pred_angle, "target_angle", target_angle)
    if tuple(target_wh.shape) != (*pred_angle.shape, 2):
        raise ValueError(f"target_wh: expected shape {(*pred_angle.shape, 2)} (w, h per angle), got {tuple(target_wh.shape)}")
    if not aspect_lambda > 0:
        raise ValueError(f"aspect_lambda: expected a positive number, got {aspect_lambda!r}")
    _check_weight(weight, pred_angle.shape)
    check_in_range("target_wh", target_wh.detach(), 0.0, math.inf, "target sides")
    dt = compute_dtype(pred_angle, target_angle, target_wh, weight)
    p, t, wh = upcast(pred_angle, dt), upcast(target_angle, dt), upcast(target_wh, dt)
    log_ar = torch.log((wh[..., 0] + 1e-9) / (wh[..., 1] + 1e-9))
    scale = torch.exp(-(log_ar ** 2) / (aspect_lambda ** 2))
    delta = p - t
    wrapped = delta - torch.round(delta / math.pi) * math.pi
    loss = scale * torch.sin(2 * wrapped) ** 2
    if weight is not None:
        loss = loss * upcast(weight, dt)
    return reduce(loss, reduction)
