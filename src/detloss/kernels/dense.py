r"""The dense losses: BCE-with-logits, sigmoid focal, BCE-blur, quality focal and varifocal.

Each loss is written twice, on purpose:

* a *closed form* ``(x, ...) -> (loss, dloss/dx)``, elementwise, that every path runs (compiled
  into one loop, or eagerly chunk by chunk), with the BCE core :func:`bce_closed_form` that the
  others build on;
* a *formula*, the loss as its original writes it (torchvision's ``sigmoid_focal_loss``, PyTorch's
  BCE expression), differentiated by autograd only where the closed form has nothing to say:
  gradients of targets or weights, second derivatives, ``vmap``.

The closed form of the BCE with :math:`p = \sigma(x)`, :math:`q = \sigma(-x)` (each computed to
full relative precision), :math:`\ell_{sp} = \log(1 + e^{-|x|})`, :math:`p_w` = ``pos_weight``
(1 without it) and :math:`l_w = 1 + (p_w - 1) y`:

.. math::
    \mathrm{BCE} = (1 - y)\max(x, 0) + p_w y \max(-x, 0) + l_w \ell_{sp},\qquad
    \frac{\partial\,\mathrm{BCE}}{\partial x} = (1 - y)\,p - p_w y\,q

Every term is a sum of non-negative parts or a difference of two independent ones, so neither
the value nor the gradient cancels: the gradient at ``x = -60, y = 0`` is :math:`\sigma(-60)`
(8.8e-27), not 0. A modulating factor :math:`f` gives :math:`\partial(\mathrm{BCE} f) = f\,
\partial\mathrm{BCE} + \mathrm{BCE}\,\partial f`, with :math:`\partial p/\partial x = p\,q`:

* sigmoid focal (Lin et al. 2017; torchvision): :math:`f = \alpha_t m^\gamma`,
  :math:`m = 1 - p_t = (1 - y) p + y q`, :math:`\partial m = p q (1 - 2y)`;
* quality focal (Li et al. 2020 GFL; YOLOv5 QFocalLoss): :math:`f = \alpha_t |y - p|^\gamma`,
  :math:`\partial |y - p| = -\mathrm{sign}(y - p)\,p q`;
* varifocal (Zhang et al. 2021; ultralytics): :math:`f = \alpha p^\gamma (1 - l) + s\,l`,
  :math:`\partial f = \alpha (1 - l)\,\gamma p^{\gamma - 1} p q`;
* BCE-blur (YOLOv5): :math:`f = 1 - z`, :math:`z = \exp((p - y - 1)/(\alpha + 10^{-4}))`,
  :math:`\partial f = -z\,p q/(\alpha + 10^{-4})`.

The closed forms are written for both ways they run: compiled, where one ``exp`` gives the sigmoid
of both signs and the softplus (the selects are free in a fused loop; the softplus's ``log1p``
is a short series, :func:`_log1p_unit`), and eager, where they use no
boolean tensors (a select over a boolean mask costs about ten multiplications on CPU) and update
their temporaries in place (never their inputs); ``1 - t`` is ``torch.rsub(t, 1)``, which skips
the Python wrapper of the reflected operator.

The ``fused_*`` functions take tensors already validated by :mod:`detloss.functional` (any floating
dtype; half precision is computed in float32) and return the loss in the compute dtype.
"""
from __future__ import annotations

import functools
from typing import Callable, Dict, NamedTuple, Optional, Tuple, Union

import torch

from ._runtime import LossPass, apply_pass, cached_pass, inductor_options

Scalar = Union[torch.Tensor, float]

#: YOLOv5's BCEBlurWithLogitsLoss adds this to ``alpha`` in the exponent's denominator.
BLUR_EPS = 1e-4


# ---------------------------------------------------------------------------------------------
# The BCE core
# ---------------------------------------------------------------------------------------------


class BCEParts(NamedTuple):
    """The elementwise BCE, its derivative and the parts the modulating factors reuse."""

    loss: torch.Tensor
    grad: torch.Tensor
    p: torch.Tensor  #: sigmoid(x)
    q: torch.Tensor  #: sigmoid(-x) = 1 - p, to full relative precision
    #: (1 - y) p + y q = 1 - p_t, the focal loss's base (|y - p| for y in {0, 1}); None where
    #: it was not needed to form the gradient (see :func:`one_minus_p_t`)
    m: Optional[torch.Tensor]


def one_minus_p_t(parts: BCEParts, y: torch.Tensor) -> torch.Tensor:
    """``1 - p_t = (1 - y) p + y q`` of :func:`bce_parts`: its own where it has it, else ``lerp(p,
    q, y)`` (the ends exactly at y = 0 or 1; non-negative, no cancellation)."""
    return parts.m if parts.m is not None else torch.lerp(parts.p, parts.q, y)


#: Coefficients 1/3, 1/5, ..., 1/13 of the atanh series (see :func:`_log1p_unit`).
_ATANH_SERIES = tuple(1.0 / k for k in range(3, 15, 2))


def _log1p_unit(e: torch.Tensor) -> torch.Tensor:
    r"""``log1p(e)`` for ``e`` in [0, 1], float32 to 2 ulps (float64: ``torch.log1p``).

    :math:`\log(1 + e) = 2\,\mathrm{atanh}(s) = 2 (s + s^3/3 + \dots + s^{13}/13)`, :math:`s =
    e / (2 + e) \le 1/3`: the first term left out is below :math:`3^{-14}/15` of the sum, and every
    term is positive (no cancellation). One division and six multiply-adds, where the vectorized
    ``log1p`` of the compiled loop costs about as much as the rest of a BCE closed form."""
    if e.dtype == torch.float64:
        return torch.log1p(e)
    s = e / (e + 2)
    t = s * s
    p = _ATANH_SERIES[-1]
    for c in reversed(_ATANH_SERIES[:-1]):
        p = p * t + c
    s2 = s + s
    return s2 + s2 * (t * p)


@functools.lru_cache(maxsize=None)
def _log1p_is_scalar() -> bool:
    """Whether this torch's CPU ``log1p`` (and with it ``log_sigmoid``, ``softplus``) runs one
    element at a time: torch 2.14's AVX-512 kernels do (about 1.1 ms for 240,000 floats on 2
    threads, 5x ``torch.log`` and 7x ``torch.sigmoid``; its AVX2 kernels and torch 2.13's AVX-512
    ones are vectorized). A property of the build, so the choice is the same on every call."""
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:  # torch before 2.1
        return False
    return capability == "AVX512" and torch.torch_version.TorchVersion(torch.__version__) >= "2.14"


def _softplus_abs(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""``(log(1 + e), e)``, :math:`e = e^{-|x|}`, on CPU (eager), each in a buffer of its own.

    ATen's ``log_sigmoid_forward(|x|)`` gives both in one kernel; where its ``log1p`` is scalar
    (:func:`_log1p_is_scalar`) they come from ``exp`` and a compensated ``log``: :math:`u = 1 +
    e` rounded, :math:`c = e - (u - 1)` its rounding error (both steps exact: :math:`u \in [1,
    2]`), :math:`\log(1 + e) = \log u + c/u` to :math:`(c/u)^2/2`, below half an ulp; at
    :math:`u = 1` (:math:`e < 2^{-24}`) that is :math:`c = e` itself, subnormals included."""
    if _log1p_is_scalar():
        return _softplus_abs_compensated(x)
    nlsp, e = torch.ops.aten.log_sigmoid_forward(x.abs())
    return nlsp.neg_(), e


def _softplus_abs_compensated(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_softplus_abs` from ``exp`` and the compensated ``log`` (no ``log1p``)."""
    e = x.abs().neg_().exp_()
    u = e + 1
    c = u - 1
    torch.sub(e, c, out=c).div_(u)
    return u.log_().add_(c), e


def _logistic(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``sigmoid(x)``, ``sigmoid(-x)`` and ``log(1 + exp(-|x|))``."""
    if torch.compiler.is_compiling():  # one exp for all three; Inductor fuses the selects
        pos = x >= 0
        e = torch.exp(-x.abs())
        r = 1 / (1 + e)
        s = e * r
        return torch.where(pos, r, s), torch.where(pos, s, r), _log1p_unit(e)
    if x.device.type == "cpu":  # sigmoid(x) as the formulas compute it (a modulating factor
        # such as BCE-blur's 1 - exp(20 (p - y - 1)) turns an ulp of p into a visible difference)
        lsp, e = _softplus_abs(x)
        return torch.sigmoid(x), _sigmoid_from(x, e), lsp
    return torch.sigmoid(x), torch.neg(x).sigmoid_(), x.abs().neg_().exp_().log1p_()


_SCALARS: Dict[Tuple[float, torch.dtype], torch.Tensor] = {}


def _scalar(value: float, dtype: torch.dtype) -> torch.Tensor:
    """A 0-dim CPU tensor of ``value`` (kept per dtype: read only, expanded by the callers)."""
    t = _SCALARS.get((value, dtype))
    if t is None:
        t = _SCALARS.setdefault((value, dtype), torch.full((), value, dtype=dtype))
    return t


def _sigmoid_from(x: torch.Tensor, e: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    r"""``scale * sigmoid(-x)`` on CPU from ``e = exp(-|x|)`` (the buffer of ATen's
    ``log_sigmoid_forward``), without another ``exp``: ``log_sigmoid_backward(g, x, e)`` is
    :math:`g\,e/(1 + e)` for :math:`x \ge 0` and :math:`g/(1 + e)` for :math:`x < 0`, i.e.
    :math:`g\,\sigma(-x)` to full relative precision on both sides."""
    g = _scalar(scale, x.dtype).expand(x.shape)
    # into a buffer laid out like x (left to itself, the op would follow the expanded scalar's
    # layout, and a transposed head output would get a gradient of another layout)
    return torch.ops.aten.log_sigmoid_backward.grad_input(g, x, e, grad_input=torch.empty_like(x))


def bce_parts(x: torch.Tensor, y: torch.Tensor, pos_weight: Optional[torch.Tensor] = None) -> BCEParts:
    """BCE-with-logits (PyTorch's ``pos_weight``) and its derivative in ``x`` (module docstring)."""
    if _eager_cpu(x, y, pos_weight):
        loss, grad, p, nq = _bce_eager_cpu(x, y, exact_p=True)
        return BCEParts(loss, grad, p, nq.neg_(), None)
    p, q, lsp = _logistic(x)
    ny = torch.rsub(y, 1)
    relu_x = x.clamp(min=0)
    a, b = ny * p, y * q
    if pos_weight is None:
        loss = lsp.addcmul_(ny, relu_x).addcmul_(y, relu_x - x)  # relu_x - x = max(-x, 0), exactly
        grad = a - b
    else:
        pwy = pos_weight * y
        loss = lsp.mul_(ny + pwy).addcmul_(ny, relu_x).addcmul_(pwy, relu_x - x)
        grad = a - pos_weight * b
    return BCEParts(loss, grad, p, q, a.add_(b))


def _pow_and_slope(base: torch.Tensor, gamma: float) -> Tuple[Scalar, Optional[Scalar]]:
    """``base ** gamma`` and its derivative ``gamma * base ** (gamma - 1)`` for ``base >= 0``.

    The slope is None for ``gamma == 0`` and 0 at ``base == 0`` for ``0 < gamma < 1`` (where the
    true slope is infinite and its product with the vanishing rest is 0). Common exponents become
    multiplications.
    """
    if gamma == 0:
        return 1.0, None
    if gamma == 1:
        return base, 1.0
    if gamma == 2:
        return base * base, 2 * base
    if gamma == 3:
        sq = base * base
        return sq * base, sq.mul_(3)
    if gamma == 1.5:
        s = torch.sqrt(base)
        return base * s, s.mul_(1.5)
    if gamma > 1:
        return base**gamma, gamma * base ** (gamma - 1)
    nz = base > 0
    safe = torch.where(nz, base, torch.ones_like(base))
    return torch.where(nz, safe**gamma, 0.0), torch.where(nz, gamma * safe ** (gamma - 1), 0.0)


def _alpha_t(y: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * y + (1 - alpha) * (1 - y)``."""
    return (2 * alpha - 1) * y + (1 - alpha)


# ---------------------------------------------------------------------------------------------
# Closed forms
# ---------------------------------------------------------------------------------------------


def _eager_cpu(x: torch.Tensor, y: torch.Tensor, pos_weight: Optional[torch.Tensor]) -> bool:
    """Whether :func:`_bce_eager_cpu` serves: eager on CPU, no ``pos_weight``, ``y`` shaped like ``x``."""
    return (pos_weight is None and x.device.type == "cpu" and not torch.compiler.is_compiling()
            and y.shape == x.shape)


def _bce_eager_cpu(x: torch.Tensor, y: torch.Tensor, exact_p: bool = False) -> Tuple[torch.Tensor, ...]:
    r"""``(loss, grad, p, -q)``: the BCE and its derivative in few eager CPU kernels, with the
    same branches; ``p = sigmoid(x)`` (``exact_p``: torch's ``sigmoid``, bit for bit what the
    formulas' modulating factors see, and ``grad`` a buffer of its own; else from ``e``, one cheap
    kernel instead of an ``exp``, and ``grad`` written over ``p``).

    :func:`_softplus_abs` gives :math:`\ell_{sp}` and :math:`e^{-|x|}`; :func:`_sigmoid_from` gives :math:`\sigma(x)` and :math:`-\sigma(-x)` from that ``e`` (no
    second ``exp``): ``log_sigmoid_backward`` reads the sign of its ``x`` argument only to pick a
    branch, so :math:`n = -\max(x, 0)`, which is negative exactly where ``x`` is positive, gives
    :math:`\sigma(x)`. ``lerp`` (which evaluates from the nearer end, ``w < 1/2`` or not) mixes
    the two non-positive ends :math:`n` and :math:`n + x = \min(x, 0)` into :math:`n + y x =
    -(\max(x, 0) - y x)`, and the two ends :math:`p`, :math:`-q`: the value at ``y = 0`` or ``1``
    is that end itself, so nothing cancels (``x = 60, y = 1``: gradient :math:`-\sigma(-60)`).

    Eager temporaries are fresh memory, and a freed one returns to the operating system at the
    end of the call (one page fault per 4 KiB when the next call touches it again): the order
    below keeps at most five input-sized buffers alive at once, each freed one reused at once.
    """
    lsp, e = _softplus_abs(x)
    n = x.clamp(min=0).neg_()
    p = torch.sigmoid(x) if exact_p else _sigmoid_from(n, e)
    m = n + x  # min(x, 0), exactly
    loss = torch.sub(lsp, torch.lerp(n, m, y, out=m), out=m)  # max(x, 0) - y x + log(1 + e)
    del n, lsp
    nq = _sigmoid_from(x, e, -1.0)
    del e
    grad = torch.lerp(p, nq, y) if exact_p else torch.lerp(p, nq, y, out=p)
    return loss, grad, p, nq


def bce_with_logits_closed_form(
    x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor], pos_weight: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise BCE-with-logits (``weight``, ``pos_weight``) and its derivative in ``x``."""
    if _eager_cpu(x, y, pos_weight):
        loss, grad = _bce_eager_cpu(x, y)[:2]
        return (loss, grad) if weight is None else (loss.mul_(weight), grad.mul_(weight))
    parts = bce_parts(x, y, pos_weight)
    if weight is None:
        return parts.loss, parts.grad
    return parts.loss.mul_(weight), parts.grad.mul_(weight)


def sigmoid_focal_closed_form(
    x: torch.Tensor, y: torch.Tensor, pos_weight: Optional[torch.Tensor], *, alpha: float, gamma: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise sigmoid focal loss (torchvision semantics; ``pos_weight`` on the BCE term as
    YOLOv5's FocalLoss) and its derivative in ``x``."""
    parts = bce_parts(x, y, pos_weight)
    ce, dce, p, q, _ = parts
    mod, slope = _pow_and_slope(one_minus_p_t(parts, y), gamma)  # base 1 - p_t (non-negative)
    loss, grad = ce * mod, dce.mul_(mod)
    if slope is not None:
        dm = p.mul_(q)
        dm.addcmul_(dm, y, value=-2)  # d m / d x = p q (1 - 2 y)
        grad.add_(dm.mul_(ce).mul_(slope))
    if alpha >= 0:
        at = _alpha_t(y, alpha)
        loss, grad = loss.mul_(at), grad.mul_(at)
    return loss, grad


def quality_focal_closed_form(
    x: torch.Tensor, y: torch.Tensor, *, gamma: float, alpha: Optional[float]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise quality focal loss (GFL's QFL / YOLOv5's QFocalLoss) and its derivative."""
    ce, dce, p, q, _ = bce_parts(x, y)
    d = y - p
    mod, slope = _pow_and_slope(d.abs(), gamma)
    loss, grad = ce * mod, dce.mul_(mod)
    if slope is not None:
        grad.sub_(torch.sign(d).mul_(p).mul_(q).mul_(ce).mul_(slope))
    if alpha is not None:
        at = _alpha_t(y, alpha)
        loss, grad = loss.mul_(at), grad.mul_(at)
    return loss, grad


def varifocal_closed_form(
    x: torch.Tensor, score: torch.Tensor, label: torch.Tensor, *, alpha: float, gamma: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise varifocal loss (ultralytics weighting, not detached) and its derivative."""
    ce, dce, p, q, _ = bce_parts(x, score)
    powp, slope = _pow_and_slope(p, gamma)
    neg = torch.rsub(label, 1).mul_(alpha)
    w = (neg * powp).add_(score * label)
    loss, grad = ce * w, dce.mul_(w)
    if slope is not None:
        grad.add_(p.mul_(q).mul_(neg).mul_(ce).mul_(slope))
    return loss, grad


def bce_blur_closed_form(
    x: torch.Tensor, y: torch.Tensor, *, alpha: float, eps: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Elementwise YOLOv5 BCE-blur (``eps`` = its 1e-4 added to alpha) and its derivative in ``x``."""
    ce, dce, p, q, _ = bce_parts(x, y)
    inv = 1 / (alpha + eps)
    z = ((p - y).sub_(1)).mul_(inv).exp_()
    dz = (z * p).mul_(q).mul_(inv)  # d z / d x
    factor = torch.rsub(z, 1)
    return ce * factor, dce.mul_(factor).sub_(dz.mul_(ce))


# ---------------------------------------------------------------------------------------------
# Formulas (autograd: targets' and weights' gradients, second derivatives, vmap)
# ---------------------------------------------------------------------------------------------


def safe_pow(base: torch.Tensor, gamma: float) -> torch.Tensor:
    """``base ** gamma`` for ``base >= 0``; for 0 < gamma < 1 the gradient at base == 0 is taken
    as 0 instead of the ``inf * 0 = NaN`` that plain ``pow`` produces."""
    if gamma == 0 or gamma >= 1:
        return base**gamma
    pos = base > 0
    return torch.where(pos, torch.where(pos, base, torch.ones_like(base)) ** gamma, torch.zeros_like(base))


def bce_with_logits_formula(
    x: torch.Tensor, y: torch.Tensor, weight: Optional[torch.Tensor] = None, pos_weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """PyTorch's own BCE-with-logits expression ``(1 - y) x - l_w log(sigmoid(x))`` (times ``weight``),
    differentiable in every tensor, twice."""
    log_sig = torch.nn.functional.logsigmoid(x)
    loss = (1 - y) * x - (log_sig if pos_weight is None else (1 + (pos_weight - 1) * y) * log_sig)
    return loss if weight is None else loss * weight


def sigmoid_focal_formula(
    x: torch.Tensor, y: torch.Tensor, pos_weight: Optional[torch.Tensor] = None, *, alpha: float = 0.25,
    gamma: float = 2.0,
) -> torch.Tensor:
    """torchvision's ``sigmoid_focal_loss``, term for term (``pos_weight`` on the BCE term)."""
    p = torch.sigmoid(x)
    ce = bce_with_logits_formula(x, y, pos_weight=pos_weight)
    p_t = p * y + (1 - p) * (1 - y)
    loss = ce * safe_pow((1 - p_t).clamp(min=0), gamma)
    if alpha >= 0:
        loss = (alpha * y + (1 - alpha) * (1 - y)) * loss
    return loss


def quality_focal_formula(x: torch.Tensor, y: torch.Tensor, *, gamma: float = 2.0, alpha: Optional[float] = None):
    """GFL's QFL / YOLOv5's QFocalLoss: ``BCE * |y - sigmoid(x)|^gamma`` (times alpha_t)."""
    loss = bce_with_logits_formula(x, y) * safe_pow((y - torch.sigmoid(x)).abs(), gamma)
    if alpha is not None:
        loss = loss * (y * alpha + (1 - y) * (1 - alpha))
    return loss


def varifocal_formula(x: torch.Tensor, score: torch.Tensor, label: torch.Tensor, *, alpha: float = 0.75,
                      gamma: float = 2.0) -> torch.Tensor:
    """ultralytics' ``VarifocalLoss`` weighting: ``(alpha p^gamma (1 - label) + score label) BCE(x, score)``."""
    weight = alpha * safe_pow(torch.sigmoid(x), gamma) * (1 - label) + score * label
    return bce_with_logits_formula(x, score) * weight


def bce_blur_formula(x: torch.Tensor, y: torch.Tensor, *, alpha: float = 0.05, eps: float = BLUR_EPS):
    """YOLOv5's ``BCEBlurWithLogitsLoss``: ``BCE * (1 - exp((sigmoid(x) - y - 1) / (alpha + eps)))``."""
    dx = torch.sigmoid(x) - y
    return bce_with_logits_formula(x, y) * (1 - torch.exp((dx - 1) / (alpha + eps)))


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------


CLOSED_FORMS: Dict[str, Callable[..., Tuple[torch.Tensor, torch.Tensor]]] = {
    "bce_with_logits": bce_with_logits_closed_form,
    "sigmoid_focal_loss": sigmoid_focal_closed_form,
    "quality_focal_loss": quality_focal_closed_form,
    "varifocal_loss": varifocal_closed_form,
    "bce_blur": bce_blur_closed_form,
}
FORMULAS: Dict[str, Callable[..., torch.Tensor]] = {
    "bce_with_logits": bce_with_logits_formula,
    "sigmoid_focal_loss": sigmoid_focal_formula,
    "quality_focal_loss": quality_focal_formula,
    "varifocal_loss": varifocal_formula,
    "bce_blur": bce_blur_formula,
}


def dense_pass_options() -> Dict[str, object]:
    """Inductor options of the dense passes (resolved at their first compile).

    Inductor stores a pointwise subexpression into a buffer of the input's size instead of
    recomputing it in each use once it has more than ``realize_cpu_opcount_threshold`` (50) ops;
    the BCE core with its ``log1p`` series passes that, and a loss pass would then write and read
    one more input-sized buffer (a ``[80, 6400]`` level of one image: 2 MB, more memory and
    time). The closed forms are one loop by design, so the threshold is lifted for them."""
    return inductor_options({"realize_cpu_opcount_threshold": 1000})


def get_pass(name: str, reduction: str, **params) -> LossPass:
    """The cached pass of dense loss ``name`` (a key of :data:`CLOSED_FORMS`)."""
    return cached_pass(name, CLOSED_FORMS[name], FORMULAS[name], reduction, options=dense_pass_options, **params)


def fused_bce_with_logits(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    pos_weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    compiled: bool = True,
) -> torch.Tensor:
    """:func:`detloss.functional.bce_with_logits` on validated arguments; ``compiled``: the
    compiled pass, else the plain one (see :func:`detloss.kernels.apply_pass`)."""
    return apply_pass(get_pass("bce_with_logits", reduction), compiled, input, target, weight, pos_weight)


def fused_sigmoid_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.25,
    gamma: float = 2.0,
    reduction: str = "none",
    pos_weight: Optional[torch.Tensor] = None,
    compiled: bool = True,
) -> torch.Tensor:
    """:func:`detloss.functional.sigmoid_focal_loss` on validated arguments."""
    pass_ = get_pass("sigmoid_focal_loss", reduction, alpha=float(alpha), gamma=float(gamma))
    return apply_pass(pass_, compiled, input, target, pos_weight)


def fused_quality_focal_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    gamma: float = 2.0,
    alpha: Optional[float] = None,
    reduction: str = "mean",
    compiled: bool = True,
) -> torch.Tensor:
    """:func:`detloss.functional.quality_focal_loss` on validated arguments."""
    a = None if alpha is None else float(alpha)
    return apply_pass(get_pass("quality_focal_loss", reduction, gamma=float(gamma), alpha=a), compiled, input, target)


def fused_varifocal_loss(
    input: torch.Tensor,
    target_score: torch.Tensor,
    label: torch.Tensor,
    alpha: float = 0.75,
    gamma: float = 2.0,
    reduction: str = "mean",
    compiled: bool = True,
) -> torch.Tensor:
    """:func:`detloss.functional.varifocal_loss` on validated arguments."""
    pass_ = get_pass("varifocal_loss", reduction, alpha=float(alpha), gamma=float(gamma))
    return apply_pass(pass_, compiled, input, target_score, label)


def fused_bce_blur(
    input: torch.Tensor, target: torch.Tensor, alpha: float = 0.05, reduction: str = "mean", compiled: bool = True
) -> torch.Tensor:
    """:func:`detloss.functional.bce_blur` on validated arguments."""
    return apply_pass(get_pass("bce_blur", reduction, alpha=float(alpha), eps=BLUR_EPS), compiled, input, target)
