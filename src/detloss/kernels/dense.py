r"""Fused dense losses: BCE-with-logits, sigmoid focal, BCE-blur, quality focal and varifocal.

Each loss is written once as an *elementwise closed form* ``(x, ...) -> (loss, dloss/dx)`` that
shares one exponential between the sigmoid and the softplus, exactly as darknet computes its
``delta`` next to its cost instead of differentiating a graph:

.. math::
    e = e^{-|x|},\quad p = \sigma(x) = \begin{cases}1/(1+e) & x \ge 0\\ e/(1+e) & x < 0\end{cases},
    \quad \ell_{\mathrm{sp}} = \log(1 + e)

    \mathrm{BCE} = \begin{cases}(1-y)\,x + l_w \ell_{\mathrm{sp}} & x \ge 0\\
                                 l_w \ell_{\mathrm{sp}} - p_w y\,x & x < 0\end{cases},\qquad
    \frac{\partial\,\mathrm{BCE}}{\partial x} = \begin{cases}(1-y) - l_w (1-p) & x \ge 0\\
                                 l_w\,p - p_w y & x < 0\end{cases}

with :math:`l_w = 1 + (p_w - 1) y` (:math:`p_w` = ``pos_weight``, 1 without it): the same branches
as :func:`detloss.functional.bce_with_logits`, so no digits are lost at large :math:`|x|`. A
modulating factor :math:`f` gives :math:`\partial(\mathrm{BCE} f) = f\,\partial\mathrm{BCE} +
\mathrm{BCE}\,\partial f`, with :math:`\partial p/\partial x = p(1-p)`:

* sigmoid focal (Lin et al. 2017; torchvision): :math:`f = \alpha_t m^\gamma`,
  :math:`m = 1 - p_t`, :math:`\partial m = p(1-p)(1 - 2y)`;
* quality focal (Li et al. 2020 GFL; YOLOv5 QFocalLoss): :math:`f = \alpha_t |y - p|^\gamma`,
  :math:`\partial |y - p| = -\mathrm{sign}(y - p)\,p(1-p)`;
* varifocal (Zhang et al. 2021; ultralytics): :math:`f = \alpha p^\gamma (1 - l) + q\,l`,
  :math:`\partial f = \alpha (1 - l)\,\gamma p^{\gamma - 1} p(1-p)`;
* BCE-blur (YOLOv5): :math:`f = 1 - z`, :math:`z = \exp((p - y - 1)/(\alpha + 10^{-4}))`,
  :math:`\partial f = -z\,p(1-p)/(\alpha + 10^{-4})`.

The ``fused_*`` functions take tensors already validated by :mod:`detloss.functional` (any floating
dtype; half precision is computed in float32) and return the loss in the compute dtype.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple, Union

import torch

from ._runtime import CompiledPass, FusedLoss, cached_pass

Scalar = Union[torch.Tensor, float]


# ---------------------------------------------------------------------------------------------
# Elementwise closed forms
# ---------------------------------------------------------------------------------------------


def _logistic(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x >= 0``, ``p = sigmoid(x)``, ``1 - p`` as ``sigmoid(-x)`` and ``log1p(exp(-|x|))``, from one exp."""
    pos = x >= 0
    e = torch.exp(-x.abs())
    r = 1 / (1 + e)
    er = e * r
    p = torch.where(pos, r, er)
    q = torch.where(pos, er, r)
    return pos, p, q, torch.log1p(e)


def _bce(
    x: torch.Tensor,
    y: torch.Tensor,
    parts: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    pos_weight: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BCE-with-logits and its derivative in ``x``, branch by branch (module docstring)."""
    pos, p, q, lsp = parts
    if pos_weight is None:
        loss = torch.where(pos, (1 - y) * x + lsp, lsp - y * x)
        grad = torch.where(pos, (1 - y) - q, p - y)
    else:
        lw = 1 + (pos_weight - 1) * y
        pwy = pos_weight * y
        loss = torch.where(pos, (1 - y) * x + lw * lsp, lw * lsp - pwy * x)
        grad = torch.where(pos, (1 - y) - lw * q, lw * p - pwy)
    return loss, grad


def _pow_and_slope(base: torch.Tensor, gamma: float) -> Tuple[Scalar, Optional[Scalar]]:
    """``base ** gamma`` and its derivative ``gamma * base ** (gamma - 1)`` for ``base >= 0``.

    The slope is None for ``gamma == 0`` and 0 at ``base == 0`` for ``0 < gamma < 1`` (the
    convention of :mod:`detloss.functional`). Common exponents become multiplications.
    """
    if gamma == 0:
        return 1.0, None
    if gamma == 1:
        return base, 1.0
    if gamma == 2:
        return base * base, 2 * base
    if gamma == 3:
        sq = base * base
        return sq * base, 3 * sq
    if gamma == 1.5:
        s = torch.sqrt(base)
        return base * s, 1.5 * s
    if gamma > 1:
        return base**gamma, gamma * base ** (gamma - 1)
    nz = base > 0
    safe = torch.where(nz, base, torch.ones_like(base))
    return torch.where(nz, safe**gamma, 0.0), torch.where(nz, gamma * safe ** (gamma - 1), 0.0)


def _alpha_t(y: torch.Tensor, alpha: float) -> torch.Tensor:
    return alpha * y + (1 - alpha) * (1 - y)


def bce_with_logits_closed_form(
    x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor], pos_weight: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise BCE-with-logits (``weight``, ``pos_weight``) and its derivative in ``x``."""
    loss, grad = _bce(x, y, _logistic(x), pos_weight)
    if weight is not None:
        loss, grad = loss * weight, grad * weight
    return loss, grad


def sigmoid_focal_closed_form(
    x: torch.Tensor, y: torch.Tensor, pos_weight: Optional[torch.Tensor], *, alpha: float, gamma: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise sigmoid focal loss (torchvision semantics; ``pos_weight`` on the BCE term as
    YOLOv5's FocalLoss) and its derivative in ``x``."""
    parts = _logistic(x)
    p, q = parts[1], parts[2]  # sigmoid(x), sigmoid(-x)
    ce, dce = _bce(x, y, parts, pos_weight)
    # m = 1 - p_t = p (1 - y) + (1 - p) y: non-negative for y in [0, 1], no cancellation
    m = p * (1 - y) + q * y
    mod, slope = _pow_and_slope(m, gamma)
    loss, grad = ce * mod, dce * mod
    if slope is not None:
        grad = grad + ce * slope * (p * q * (1 - 2 * y))
    if alpha >= 0:
        at = _alpha_t(y, alpha)
        loss, grad = at * loss, at * grad
    return loss, grad


def quality_focal_closed_form(
    x: torch.Tensor, y: torch.Tensor, *, gamma: float, alpha: Optional[float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise quality focal loss (GFL's QFL / YOLOv5's QFocalLoss) and its derivative."""
    parts = _logistic(x)
    p = parts[1]
    ce, dce = _bce(x, y, parts)
    d = y - p
    mod, slope = _pow_and_slope(d.abs(), gamma)
    loss, grad = ce * mod, dce * mod
    if slope is not None:
        grad = grad - ce * slope * torch.sign(d) * (p * (1 - p))
    if alpha is not None:
        at = _alpha_t(y, alpha)
        loss, grad = loss * at, grad * at
    return loss, grad


def varifocal_closed_form(
    x: torch.Tensor, score: torch.Tensor, label: torch.Tensor, *, alpha: float, gamma: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise varifocal loss (ultralytics weighting, not detached) and its derivative."""
    parts = _logistic(x)
    p = parts[1]
    ce, dce = _bce(x, score, parts)
    powp, slope = _pow_and_slope(p, gamma)
    neg = alpha * (1 - label)
    w = neg * powp + score * label
    loss, grad = ce * w, dce * w
    if slope is not None:
        grad = grad + ce * neg * slope * (p * (1 - p))
    return loss, grad


def bce_blur_closed_form(
    x: torch.Tensor, y: torch.Tensor, *, alpha: float, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise YOLOv5 BCE-blur (``eps`` = its 1e-4 added to alpha) and its derivative in ``x``."""
    parts = _logistic(x)
    p = parts[1]
    ce, dce = _bce(x, y, parts)
    denom = alpha + eps
    z = torch.exp((p - y - 1) / denom)
    factor = 1 - z
    return ce * factor, dce * factor - ce * z * (p * (1 - p)) / denom


# ---------------------------------------------------------------------------------------------
# Public fused entry points
# ---------------------------------------------------------------------------------------------


CLOSED_FORMS: Dict[str, Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = {
    "bce_with_logits": bce_with_logits_closed_form,
    "sigmoid_focal_loss": sigmoid_focal_closed_form,
    "quality_focal_loss": quality_focal_closed_form,
    "varifocal_loss": varifocal_closed_form,
    "bce_blur": bce_blur_closed_form,
}


def get_pass(name: str, reduction: str, **params) -> CompiledPass:
    """The cached compiled pass of dense loss ``name`` (a key of :data:`CLOSED_FORMS`)."""
    return cached_pass(name, CLOSED_FORMS[name], reduction, **params)


def fused_bce_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Fused :func:`detloss.functional.bce_with_logits` (same arguments, validated)."""
    return FusedLoss.apply(get_pass("bce_with_logits", reduction), input, target, weight, pos_weight)


def fused_sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    pos_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Fused :func:`detloss.functional.sigmoid_focal_loss` (same arguments, validated)."""
    run = get_pass("sigmoid_focal_loss", reduction, alpha=float(alpha), gamma=float(gamma))
    return FusedLoss.apply(run, input, target, pos_weight)


def fused_quality_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: Optional[float] = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Fused :func:`detloss.functional.quality_focal_loss` (same arguments, validated)."""
    a = None if alpha is None else float(alpha)
    run = get_pass("quality_focal_loss", reduction, gamma=float(gamma), alpha=a)
    return FusedLoss.apply(run, input, target)


def fused_varifocal_loss(
    input: torch.Tensor,
    target_score: torch.Tensor,
    label: torch.Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Fused :func:`detloss.functional.varifocal_loss` (same arguments, validated)."""
    run = get_pass("varifocal_loss", reduction, alpha=float(alpha), gamma=float(gamma))
    return FusedLoss.apply(run, input, target_score, label)


def fused_bce_blur(
    input: torch.Tensor, target: torch.Tensor, alpha: float = 0.05, reduction: str = "mean"
) -> torch.Tensor:
    """Fused :func:`detloss.functional.bce_blur` (same arguments, validated)."""
    from ..functional.bce import BLUR_EPS  # late: functional imports this package

    run = get_pass("bce_blur", reduction, alpha=float(alpha), eps=BLUR_EPS)
    return FusedLoss.apply(run, input, target)
