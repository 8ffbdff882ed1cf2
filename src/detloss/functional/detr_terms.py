"""Loss pieces of the DETR family that the other functional modules don't have.

- :func:`paired_box_iou`: IoU / GIoU of aligned pairs with the numbers of torchvision's
  *pairwise* ``box_iou`` / ``generalized_box_iou`` (no eps), i.e. ``torch.diag`` of the matrix
  DETR, RT-DETR, D-FINE and DEIM compute, without computing the matrix.
- :func:`set_varifocal_loss`: the varifocal loss of RT-DETR / D-FINE (weight from the detached
  probability) and of ultralytics' RT-DETR (weight with its gradient).
- :func:`onehot_class_loss`: the summed varifocal / focal / BCE class loss of a set prediction
  against the one-hot targets of its matched queries, without building the ``[B, Q, C]`` targets.
- :func:`matchability_aware_loss`: DEIM's MAL.
- :func:`fgl_targets`, :func:`fine_grained_localization_loss`: D-FINE's fine-grained
  localization (FGL) loss on its non-uniform distance bins.
- :func:`decoupled_distillation_loss`: the KL term of D-FINE's decoupled distillation focal
  (DDF) loss.

References: Carion et al. 2020 (DETR, arXiv:2005.12872); Zhao et al. 2024 (RT-DETR,
arXiv:2304.08069) and Lv et al. 2024 (RT-DETRv2, arXiv:2407.17140); Peng et al. 2024, "D-FINE:
Redefine Regression Task in DETRs as Fine-grained Distribution Refinement" (arXiv:2410.13842,
code Peterande/D-FINE ``src/zoo/dfine/dfine_criterion.py``, ``dfine_utils.py``); Huang et al.
2025, "DEIM: DETR with Improved Matching for Fast Convergence" (arXiv:2412.04234, code
ShihuaHuang95/DEIM ``engine/deim/deim_criterion.py``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import kernels
from ..kernels.dense import safe_pow
from .._checks import check_choice, check_floating, check_reduction, check_same_shape, check_tensor, compute_dtype, upcast
from ._common import reduce
from .bce import bce_with_logits
from .cross_entropy import cross_entropy
from .iou import pairwise_box_iou

__all__ = [
    "paired_box_iou",
    "set_varifocal_loss",
    "onehot_class_loss",
    "matchability_aware_loss",
    "fgl_bin_values",
    "fgl_targets",
    "fine_grained_localization_loss",
    "decoupled_distillation_loss",
    "DDF_TEMPERATURE",
    "FGL_EPS",
]

#: Temperature of D-FINE's decoupled distillation (``loss_local(..., T=5)``).
DDF_TEMPERATURE = 5.0
#: D-FINE's ``bbox2distance`` clamps the bin targets to ``[0, reg_max - FGL_EPS]``.
FGL_EPS = 0.1
#: ``bbox2distance`` adds this to the reference size in its denominators.
FGL_SIZE_EPS = 1e-16


def paired_box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, *, kind: str = "iou", validate: bool = True) -> torch.Tensor:
    r"""IoU or GIoU (``kind`` "iou" | "giou") of aligned xyxy pairs ``[P, 4]`` x ``[P, 4]`` -> ``[P]``,
    with the formulas and numbers of torchvision's pairwise ``box_iou`` / ``generalized_box_iou``
    (no eps: :math:`|A\cap B| / |A\cup B|` and :math:`\mathrm{IoU} - (|C| - |A\cup B|) / |C|`;
    a pair with zero union or zero enclosing area gives 0 where those give NaN).

    It is ``torch.diag(generalized_box_iou(a, b))`` as DETR's and RT-DETR's ``loss_boxes``
    compute it, in ``O(P)`` instead of ``O(P^2)``; the aligned functions of
    :mod:`detloss.functional` add eps=1e-7 to the union, as torchvision's losses do.
    """
    if kind not in ("iou", "giou"):
        raise ValueError(f"kind: expected one of ('iou', 'giou'), got {kind!r}")
    for name, b in (("boxes1", boxes1), ("boxes2", boxes2)):
        check_floating(name, b)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"{name}: expected aligned xyxy boxes [P, 4], got {tuple(b.shape)}")
    check_same_shape("boxes1", boxes1, "boxes2", boxes2)
    return pairwise_box_iou(boxes1[:, None, :], boxes2[:, None, :], kind=kind, validate=validate)[:, 0, 0]


def _check_class_pair(input: torch.Tensor, target_score: torch.Tensor, label: torch.Tensor) -> torch.dtype:
    check_floating("input", input)
    check_floating("target_score", target_score)
    check_tensor("label", label)
    check_same_shape("input", input, "target_score", target_score)
    check_same_shape("input", input, "label", label)
    return compute_dtype(input, target_score)


def set_varifocal_loss(
    input: torch.Tensor,
    target_score: torch.Tensor,
    label: torch.Tensor,
    *,
    alpha: float = 0.75,
    gamma: float = 2.0,
    detach_weight: bool = True,
    reduction: str = "none",
) -> torch.Tensor:
    r"""Varifocal loss as the set-prediction losses write it:

    .. math:: \ell = \mathrm{BCE}(x, q)\,\bigl[\alpha\,\sigma(x)^\gamma\,(1 - l) + q\,l\bigr]

    ``q`` = ``target_score`` (the matched IoU at the target class, 0 elsewhere), ``l`` = ``label``
    (one-hot). ``detach_weight=True``: the weight is computed from the detached probability, as
    RT-DETR, RT-DETRv2, D-FINE and DEIM do (``loss_labels_vfl``); False: it keeps its gradient, as
    ultralytics' ``VarifocalLoss`` (the value and gradient of
    :func:`detloss.functional.varifocal_loss`, with PyTorch's BCE kernel for the BCE factor).
    Source: Zhang et al. 2021, VarifocalNet (arXiv:2008.13367); lyuwenyu/RT-DETR
    ``rtdetrv2_criterion.py``. Defaults: RT-DETRv2's configs (alpha=0.75, gamma=2); reduction
    "none" (the criteria reduce with ``.mean(1).sum()``).
    """
    dt = _check_class_pair(input, target_score, label)
    check_reduction(reduction)
    x, q, lab = upcast(input, dt), upcast(target_score, dt).detach(), label.to(dt)
    p = torch.sigmoid(x.detach() if detach_weight else x)
    weight = float(alpha) * p.pow(float(gamma)) * (1 - lab) + q * lab
    if detach_weight:
        return bce_with_logits(x, q, weight=weight.detach(), reduction=reduction)
    return reduce(bce_with_logits(x, q, reduction="none") * weight, reduction)


def fused_for_layers(inputs) -> bool:
    """Whether the dense passes over several layers' logits run compiled: as
    :func:`detloss.kernels.use_fused` decides for one of them, with the size threshold
    (``DETLOSS_FUSED_MIN_NUMEL``) applied to their total size (a decoder's layers are one loss)."""
    inputs = list(inputs)
    if not inputs or any(kernels.use_fused(x) for x in inputs):
        return bool(inputs)
    if sum(x.numel() for x in inputs) < kernels.min_numel() or not kernels.fused_enabled():
        return False
    return torch.is_grad_enabled() and not torch.compiler.is_compiling() and all(
        x.requires_grad and not kernels.is_functorch_wrapped(x) for x in inputs)


ONEHOT_CLASS_KINDS = ("varifocal", "focal", "bce")


def onehot_class_loss(
    input: torch.Tensor,
    batch_index: torch.Tensor,
    query_index: torch.Tensor,
    labels: torch.Tensor,
    score: Optional[torch.Tensor] = None,
    *,
    kind: str = "varifocal",
    alpha: float = 0.25,
    gamma: float = 1.5,
    compiled: Optional[bool] = None,
) -> torch.Tensor:
    r"""The class loss of set-prediction logits ``input [B, Q, C]`` summed over every entry, against
    the one-hot targets of the matched queries: entry ``(batch_index[k], query_index[k],
    labels[k])`` has label 1 and score ``score[k]`` (``[P]``, e.g. the matched IoU; detached),
    every other entry label and score 0. ``kind``:

    - ``"varifocal"``: :func:`set_varifocal_loss` with ``detach_weight=False`` (ultralytics'
      ``VarifocalLoss``, ``BCE(x, s) (alpha sigma(x)^gamma (1 - l) + s l)``);
    - ``"focal"``: :func:`~detloss.functional.sigmoid_focal_loss` against the labels;
    - ``"bce"``: BCE-with-logits against the scores.

    The same sum as the dense loss over the one-hot tensors, computed without them: the loss of
    target 0 on every entry (one fused pass of :mod:`detloss.kernels`; for the varifocal loss
    that is ``alpha sigma(x)^gamma BCE(x, 0)``, the sigmoid focal loss of target 0 with
    ``1 - alpha``) plus, at the ``P`` matched entries, their loss minus that target-0 term.
    Indices are unique (one label per matched query). ``compiled``: run the dense pass compiled
    (None: :func:`detloss.kernels.use_fused` decides; see :func:`fused_for_layers`). Returns a
    0-dim tensor (compute dtype).
    """
    kind = check_choice("kind", kind, ONEHOT_CLASS_KINDS)
    check_floating("input", input)
    if input.ndim != 3:
        raise ValueError(f"input: expected logits [B, Q, C], got {tuple(input.shape)}")
    if kind != "focal" and score is None:
        raise ValueError(f"score: expected the matched entries' scores [P] for kind={kind!r}, got None")
    alpha, gamma = float(alpha), float(gamma)
    if kind == "varifocal" and not 0.0 <= alpha <= 1.0:  # outside [0, 1] the focal form has no alpha_t
        lab = torch.zeros_like(input)
        lab[batch_index, query_index, labels] = 1
        tgt = torch.zeros_like(input)
        tgt[batch_index, query_index, labels] = score.detach().to(input.dtype)
        return set_varifocal_loss(input, tgt, lab, alpha=alpha, gamma=gamma, detach_weight=False, reduction="sum")
    zero = input.new_zeros((1, 1, 1))
    compiled = kernels.use_fused(input, zero) if compiled is None else bool(compiled) and input.requires_grad
    if kind == "bce":
        dense = kernels.fused_bce_with_logits(input, zero, reduction="sum", compiled=compiled)
    else:
        a0 = 1.0 - alpha if kind == "varifocal" else alpha
        dense = kernels.fused_sigmoid_focal_loss(input, zero, a0, gamma, "sum", compiled=compiled)
    if batch_index.numel() == 0:
        return dense
    x = input[batch_index, query_index, labels]
    dt = compute_dtype(x, score)
    x = upcast(x, dt)
    s = None if score is None else upcast(score.detach(), dt)
    return dense + _matched_correction(x, s, kind, alpha, gamma)


def _matched_correction(x: torch.Tensor, s: Optional[torch.Tensor], kind: str, alpha: float, gamma: float) -> torch.Tensor:
    r"""At the ``P`` matched entries ``x`` (scores ``s``), the sum of their loss minus the loss of
    target 0 that the dense pass counted there, in a few autograd ops on ``[P]``. With
    :math:`\ell^+ = -\log\sigma(x)` (the BCE of target 1) and :math:`\ell^- = -\log\sigma(-x)`
    (of target 0), :math:`p = \sigma(x)`, :math:`q = \sigma(-x)`:

    - focal: :math:`lpha q^\gamma \ell^+ - (1 - lpha) p^\gamma \ell^-`;
    - bce: :math:`\mathrm{BCE}(x, s) - \mathrm{BCE}(x, 0) = -s\,x`;
    - varifocal: :math:`s\,\mathrm{BCE}(x, s) - lpha p^\gamma \ell^-`,
      :math:`\mathrm{BCE}(x, s) = (1 - s)\,\ell^- + s\,\ell^+`.
    """
    if kind == "bce":
        return -(s * x).sum()  # type: ignore[operator]
    l_pos, l_neg = -torch.nn.functional.logsigmoid(x), -torch.nn.functional.logsigmoid(-x)
    p_gamma = safe_pow(torch.sigmoid(x), gamma)  # 0 < gamma < 1: a finite gradient where p underflows to 0
    if kind == "focal":
        return (alpha * safe_pow(torch.sigmoid(-x), gamma) * l_pos - (1.0 - alpha) * p_gamma * l_neg).sum()
    bce = torch.lerp(l_neg, l_pos, s)  # type: ignore[arg-type]
    return (s * bce - alpha * p_gamma * l_neg).sum()


def matchability_aware_loss(
    input: torch.Tensor,
    target_score: torch.Tensor,
    label: torch.Tensor,
    *,
    gamma: float = 1.5,
    alpha: Optional[float] = None,
    reduction: str = "none",
) -> torch.Tensor:
    r"""DEIM's matchability-aware loss (MAL):

    .. math:: \ell = \mathrm{BCE}(x, q^\gamma)\,\bigl[a\,\mathrm{sg}(\sigma(x))^\gamma\,(1 - l) + l\bigr]

    with ``q`` = ``target_score`` (the matched IoU at the target class, 0 elsewhere), ``l`` the
    one-hot ``label`` and ``a`` = ``alpha`` (1 when None: DEIM's ``mal_alpha=None``). Source:
    Huang et al. 2025 (arXiv:2412.04234) eq. (3); ShihuaHuang95/DEIM ``deim_criterion.py``
    ``loss_labels_mal`` (its configs: gamma=1.5). Reduction "none" by default.
    """
    dt = _check_class_pair(input, target_score, label)
    check_reduction(reduction)
    gamma = float(gamma)
    if not gamma > 0:
        raise ValueError(f"gamma: expected a number > 0, got {gamma!r}")
    x, q, lab = upcast(input, dt), upcast(target_score, dt), label.to(dt)
    neg = torch.sigmoid(x.detach()).pow(gamma) * (1 - lab)
    if alpha is not None:
        neg = float(alpha) * neg
    return bce_with_logits(x, q.detach().pow(gamma), weight=(neg + lab).detach(), reduction=reduction)


def fgl_bin_values(reg_max: int, up: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    r"""D-FINE's non-uniform weighting function :math:`W(n)`, ``reg_max + 1`` bin values:
    :math:`\pm 2\,|u\,s|` at the ends and :math:`\pm(c^i - 1)` inside, :math:`c = (|u\,s| + 1)^{2 / (reg\_max - 2)}`
    (``u`` = ``up``, ``s`` = ``reg_scale``; ``dfine_utils.weighting_function``), in their dtype."""
    if not isinstance(reg_max, int) or isinstance(reg_max, bool) or reg_max < 4 or reg_max % 2:
        raise ValueError(f"reg_max: expected an even int >= 4, got {reg_max!r}")
    u = up.reshape(-1)[:1].abs()
    s = reg_scale.reshape(-1)[:1].abs()
    bound1 = u * s
    bound2 = u * s * 2
    step = (bound1 + 1) ** (2 / (reg_max - 2))
    # one power per bin, as the original (tensor ** python int), so the values round the same
    left = [-(step ** i) + 1 for i in range(reg_max // 2 - 1, 0, -1)]
    right = [step ** i - 1 for i in range(1, reg_max // 2)]
    return torch.cat([-bound2, *left, torch.zeros_like(u), *right, bound2])


def fgl_targets(
    ref_points: torch.Tensor,
    target_boxes: torch.Tensor,
    reg_max: int,
    reg_scale: torch.Tensor,
    up: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""FGL targets of matched pairs (D-FINE's ``bbox2distance`` + ``translate_gt``).

    For reference points ``[P, 4]`` (cxcywh) and target boxes ``[P, 4]`` (xyxy), the four side
    distances in units of the reference size, :math:`d = (x_{ref} - x_1) / (w_{ref} / s + 10^{-16}) - s / 2`
    (``s = |reg_scale|``; likewise top, right, bottom), are located among the bins of
    :func:`fgl_bin_values`: ``bins [4P]`` = the left bin (clamped to ``[0, reg_max - 0.1]``),
    ``weight_right`` / ``weight_left`` ``[4P]`` the linear interpolation weights (0/1 beyond the
    ends). No gradient (the original detaches them).
    """
    with torch.no_grad():
        s = reg_scale.reshape(-1)[:1].abs()
        px, py, pw, ph = ref_points.unbind(-1)
        x1, y1, x2, y2 = target_boxes.unbind(-1)
        left = (px - x1) / (pw / s + FGL_SIZE_EPS) - 0.5 * s
        top = (py - y1) / (ph / s + FGL_SIZE_EPS) - 0.5 * s
        right = (x2 - px) / (pw / s + FGL_SIZE_EPS) - 0.5 * s
        bottom = (y2 - py) / (ph / s + FGL_SIZE_EPS) - 0.5 * s
        dist = torch.stack((left, top, right, bottom), -1).reshape(-1)
        values = fgl_bin_values(reg_max, up, reg_scale).to(dist.dtype)
        idx = (values[None, :] <= dist[:, None]).sum(1) - 1  # last bin value <= d
        below, above = idx < 0, idx >= reg_max
        i = idx.clamp(0, reg_max - 1)
        lo, hi = values[i], values[i + 1]
        dl, dr = (dist - lo).abs(), (hi - dist).abs()
        span = dl + dr  # 0 only for a flat W(n) (up or reg_scale 0), where the original divides 0 by 0
        w_right = torch.where(span > 0, dl / torch.where(span > 0, span, torch.ones_like(span)), torch.zeros_like(dl))
        w_right = torch.where(below, torch.zeros_like(w_right), torch.where(above, torch.ones_like(w_right), w_right))
        w_left = 1.0 - w_right
        bins = torch.where(above, torch.full_like(dist, reg_max - FGL_EPS), i.to(dist.dtype))
        bins = torch.where(below, torch.zeros_like(bins), bins).clamp(0, reg_max - FGL_EPS)
    return bins, w_right, w_left


def fine_grained_localization_loss(
    pred_corners: torch.Tensor,
    bins: torch.Tensor,
    weight_right: torch.Tensor,
    weight_left: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "sum",
) -> torch.Tensor:
    r"""D-FINE's fine-grained localization loss (its ``unimodal_distribution_focal_loss``) on
    ``pred_corners [M, reg_max + 1]`` logits of one box side each:

    .. math:: \ell = w\,\bigl[\omega_l\,\mathrm{CE}(z, \lfloor b \rfloor) + \omega_r\,\mathrm{CE}(z, \lfloor b \rfloor + 1)\bigr]

    with ``b`` = ``bins [M]`` (from :func:`fgl_targets`), :math:`\omega_l, \omega_r` the
    interpolation weights and ``w`` the optional per-side weight (D-FINE: the matched IoU).
    Source: Peng et al. 2024 (arXiv:2410.13842) eq. (4). Reduction "sum" by default (the
    criterion divides the sum by the number of boxes).
    """
    check_floating("pred_corners", pred_corners)
    if pred_corners.ndim != 2 or pred_corners.shape[1] < 2:
        raise ValueError(f"pred_corners: expected [M, reg_max + 1] logits, got {tuple(pred_corners.shape)}")
    m = pred_corners.shape[0]
    for name, t in (("bins", bins), ("weight_right", weight_right), ("weight_left", weight_left), ("weight", weight)):
        if t is not None:
            check_floating(name, t)
            if t.shape != (m,):
                raise ValueError(f"{name}: expected [{m}] (one per row of pred_corners), got {tuple(t.shape)}")
    check_reduction(reduction)
    if m and bool(((bins < 0) | (bins >= pred_corners.shape[1] - 1)).any()):
        raise ValueError(f"bins: expected values in [0, {pred_corners.shape[1] - 1}) (below reg_max), got out-of-range bins")
    dt = compute_dtype(pred_corners, bins, weight)
    z = upcast(pred_corners, dt)
    left = bins.long()
    loss = cross_entropy(z, left, reduction="none") * weight_left.to(dt) \
        + cross_entropy(z, left + 1, reduction="none") * weight_right.to(dt)
    if weight is not None:
        loss = loss * weight.to(dt)
    return reduce(loss, reduction)


def decoupled_distillation_loss(
    pred_corners: torch.Tensor,
    teacher_corners: torch.Tensor,
    *,
    weight: Optional[torch.Tensor] = None,
    temperature: float = DDF_TEMPERATURE,
    reduction: str = "none",
) -> torch.Tensor:
    r"""Per-side distillation term of D-FINE's DDF loss: the KL divergence from the teacher's
    (last layer's) bin distribution to the student's, at temperature ``T``, times :math:`T^2`:

    .. math:: \ell = w\,T^2\,\mathrm{KL}\bigl(\mathrm{softmax}(\mathrm{sg}(z_t) / T)\,\|\,\mathrm{softmax}(z / T)\bigr)

    rows ``[M, reg_max + 1]``; ``w`` the optional per-row weight (D-FINE: the teacher's top class
    score, the IoU for matched queries). Source: Peng et al. 2024 (arXiv:2410.13842) eq. (6),
    code ``loss_local`` (``nn.KLDivLoss(reduction="none")(log_softmax(pred / T),
    softmax(teacher / T)).sum(-1)``, T = 5). The teacher gets no gradient.
    """
    check_floating("pred_corners", pred_corners)
    check_floating("teacher_corners", teacher_corners)
    check_same_shape("pred_corners", pred_corners, "teacher_corners", teacher_corners)
    if pred_corners.ndim != 2:
        raise ValueError(f"pred_corners: expected [M, reg_max + 1] logits, got {tuple(pred_corners.shape)}")
    if weight is not None:
        check_floating("weight", weight)
        if weight.shape != pred_corners.shape[:1]:
            raise ValueError(f"weight: expected [{pred_corners.shape[0]}], got {tuple(weight.shape)}")
    check_reduction(reduction)
    t = float(temperature)
    if not t > 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    dt = compute_dtype(pred_corners, teacher_corners, weight)
    logp = torch.log_softmax(upcast(pred_corners, dt) / t, dim=1)
    q = torch.softmax(upcast(teacher_corners, dt).detach() / t, dim=1)
    kl = torch.nn.functional.kl_div(logp, q, reduction="none").sum(-1)
    loss = kl * (t ** 2)
    if weight is not None:
        loss = weight.to(dt).detach() * loss
    return reduce(loss, reduction)
