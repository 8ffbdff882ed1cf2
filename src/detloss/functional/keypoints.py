"""Keypoint losses: the OKS keypoint loss, object keypoint similarity, and RLE with a RealNVP flow.

References:
    COCO keypoint evaluation (``cocoeval.computeOks``): the similarity of a predicted keypoint
    at squared distance ``d`` from the truth is ``exp(-d / (2 s^2 k^2))`` with ``s^2`` the
    object's area and ``k = 2 sigma`` the keypoint's constant.
    Maji et al. 2022, "YOLO-Pose" (arXiv:2204.06806): the OKS loss ``1 - OKS``.
    Li et al. 2021, "Human Pose Regression with Residual Log-likelihood Estimation" (RLE,
    arXiv:2107.11291), with mmpose's ``RLELoss`` and RealNVP (Dinh et al. 2017,
    arXiv:1605.08803).
    ultralytics 8.4 ``utils/loss.py`` (``KeypointLoss``, ``RLELoss``,
    ``PoseLoss26.calculate_rle_loss``), ``utils/tal.py`` (``PoseTaskAlignedAssigner.pair_overlaps``),
    ``utils/metrics.py`` (``OKS_SIGMA``, ``RLE_WEIGHT``) and ``nn/modules/block.py`` (``RealNVP``).
"""
from __future__ import annotations

import math
from typing import Callable, Mapping, Optional

import torch

from .._checks import check_floating, check_reduction, check_tensor, compute_dtype, upcast
from ._common import check_in_range, reduce

__all__ = [
    "COCO_KEYPOINT_SIGMAS",
    "COCO_RLE_WEIGHTS",
    "keypoint_similarity",
    "object_keypoint_similarity",
    "keypoint_loss",
    "realnvp_log_prob",
    "rle_loss",
    "RLE_ERROR_CLAMP",
]

#: COCO's 17 per-keypoint OKS constants sigma (nose, eyes, ears, shoulders, elbows, wrists, hips,
#: knees, ankles), as float32 values: ultralytics' ``OKS_SIGMA`` (cocoeval's ``kpt_oks_sigmas``).
COCO_KEYPOINT_SIGMAS = (
    torch.tensor([0.26, 0.25, 0.25, 0.35, 0.35, 0.79, 0.79, 0.72, 0.72, 0.62, 0.62, 1.07, 1.07, 0.87, 0.87, 0.89, 0.89],
                 dtype=torch.float32) / 10.0
)
#: ultralytics' per-keypoint RLE weights for the 17 COCO keypoints (``RLE_WEIGHT``, float32).
COCO_RLE_WEIGHTS = torch.tensor(
    [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5, 1.0, 1.0, 1.2, 1.2, 1.5, 1.5], dtype=torch.float32
)
#: RLE clamps the normalized error to [-RLE_ERROR_CLAMP, RLE_ERROR_CLAMP] (ultralytics ``calculate_rle_loss``).
RLE_ERROR_CLAMP = 100.0
#: Added to sigma before dividing by it (ultralytics ``calculate_rle_loss``).
RLE_SIGMA_EPS = 1e-9


def _check_keypoints(pred: object, target: object) -> None:
    check_floating("pred", pred)
    check_floating("target", target)
    if pred.dim() < 2 or pred.shape[-1] < 2:
        raise ValueError(f"pred: expected keypoints of shape [..., K, D] with D >= 2 (x, y first), got {tuple(pred.shape)}")
    if target.shape[:-1] != pred.shape[:-1] or target.shape[-1] < 2:
        raise ValueError(
            f"target: expected keypoints of shape {(*pred.shape[:-1], 'D >= 2')} like pred, got {tuple(target.shape)}"
        )


def _check_sigmas(sigmas: object, k: int) -> torch.Tensor:
    check_floating("sigmas", sigmas)
    if tuple(sigmas.shape) != (k,):
        raise ValueError(f"sigmas: expected one per keypoint, shape ({k},), got {tuple(sigmas.shape)}")
    if not bool((sigmas > 0).all()):
        raise ValueError(f"sigmas: expected positive values, got {sigmas.tolist()}")
    return sigmas


def _check_area(area: object, lead: torch.Size) -> None:
    check_floating("area", area)
    if tuple(area.shape) not in (tuple(lead), (*lead, 1)):
        raise ValueError(f"area: expected shape {tuple(lead)} or {(*lead, 1)} (one per object), got {tuple(area.shape)}")
    check_in_range("area", area.detach(), 0.0, math.inf, "object areas")


def keypoint_similarity(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    area: torch.Tensor,
    sigmas: torch.Tensor,
    eps: float = 1e-9,
) -> torch.Tensor:
    r"""Per-keypoint similarity ``[..., K]`` of keypoints ``[..., K, D]`` (x, y first):

    .. math:: s_k = \exp\Bigl(-\frac{d_k}{(2\sigma_k)^2\,(A + \epsilon)\,2}\Bigr),\qquad
              d_k = (x_k - \hat x_k)^2 + (y_k - \hat y_k)^2

    with ``area`` ``A`` one value per object ``[...]`` (or ``[..., 1]``) in the keypoints' squared
    units; COCO's ``computeOks`` term (``k = 2 sigma``, ``s^2`` = area) as ultralytics writes it.
    """
    _check_keypoints(pred, target)
    k = pred.shape[-2]
    _check_sigmas(sigmas, k)
    _check_area(area, pred.shape[:-2])
    dt = compute_dtype(pred, target, area)
    p, t = upcast(pred, dt), upcast(target, dt)
    a = upcast(area, dt)
    a = a if a.dim() == p.dim() - 1 else a[..., None]
    d = (p[..., 0] - t[..., 0]).pow(2) + (p[..., 1] - t[..., 1]).pow(2)
    return torch.exp(-d / ((2 * sigmas.to(p.device)).pow(2) * (a + eps) * 2))


def object_keypoint_similarity(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    visible: torch.Tensor,
    area: torch.Tensor,
    sigmas: torch.Tensor,
    eps: float = 1e-9,
) -> torch.Tensor:
    r"""OKS of each object ``[...]``: the mean of :func:`keypoint_similarity` over its visible
    keypoints (``visible`` bool ``[..., K]``), 0 for an object without any:
    :math:`\sum_k s_k v_k / \max(\sum_k v_k, 1)` (COCO ``computeOks``; ultralytics 8.4's
    ``PoseTaskAlignedAssigner`` calls it with the box area times 0.53)."""
    sim = keypoint_similarity(pred, target, area=area, sigmas=sigmas, eps=eps)
    check_tensor("visible", visible)
    if visible.shape != sim.shape:
        raise ValueError(f"visible: expected shape {tuple(sim.shape)} (one flag per keypoint), got {tuple(visible.shape)}")
    vis = visible.to(torch.bool)
    return (sim * vis).sum(-1) / vis.sum(-1).clamp(min=1)


def keypoint_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    visible: torch.Tensor,
    area: torch.Tensor,
    sigmas: torch.Tensor,
    reduction: str = "mean",
) -> torch.Tensor:
    r"""OKS keypoint loss of ultralytics 8.4 ``KeypointLoss`` (YOLO-Pose): for object ``n`` with
    ``K`` keypoints of which ``V_n`` are visible,

    .. math:: \ell_{n,k} = \frac{K}{V_n + 10^{-9}}\,(1 - s_{n,k})\,v_{n,k}

    with :math:`s_{n,k}` from :func:`keypoint_similarity` (``eps`` 1e-9 on the area) and
    ``v`` the visibility. ``pred`` / ``target`` ``[N, K, D]`` (x, y first), ``visible`` bool
    ``[N, K]``, ``area`` ``[N]`` or ``[N, 1]``, ``sigmas`` ``[K]``. ``reduction="none"`` gives
    ``[N, K]``; "mean" (the original's) the mean over all ``N * K`` entries.
    """
    check_reduction(reduction)
    sim = keypoint_similarity(pred, target, area=area, sigmas=sigmas)
    check_tensor("visible", visible)
    if visible.shape != sim.shape:
        raise ValueError(f"visible: expected shape {tuple(sim.shape)} (one flag per keypoint), got {tuple(visible.shape)}")
    vis = visible.to(torch.bool)
    factor = vis.shape[-1] / (vis.sum(-1, keepdim=True).to(sim.dtype) + 1e-9)  # not in the default dtype
    return reduce(factor * ((1 - sim) * vis), reduction)


# ---------------------------------------------------------------------------------------- RLE
def _linear(x: torch.Tensor, state: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return torch.nn.functional.linear(x, state[prefix + ".weight"], state[prefix + ".bias"])


def _coupling_net(x: torch.Tensor, state: Mapping[str, torch.Tensor], prefix: str, bounded: bool) -> torch.Tensor:
    """Linear(2, 64) - SiLU - Linear(64, 64) - SiLU - Linear(64, 2) [- Tanh] at ``prefix.0/.2/.4``."""
    h = torch.nn.functional.silu(_linear(x, state, prefix + ".0"))
    h = torch.nn.functional.silu(_linear(h, state, prefix + ".2"))
    h = _linear(h, state, prefix + ".4")
    return torch.tanh(h) if bounded else h


def realnvp_log_prob(x: torch.Tensor, state: Mapping[str, torch.Tensor], *, square_in_float32: bool = False) -> torch.Tensor:
    r"""Log-density ``[N]`` of points ``x`` ``[N, 2]`` under a RealNVP flow with a standard normal
    prior (Dinh et al. 2017; the flow of RLE in mmpose and ultralytics 8.4 ``RealNVP``).

    ``state`` holds the flow's tensors under the names of ultralytics' ``RealNVP.state_dict()``:
    ``mask`` ``[L, 2]`` (0/1, alternating), and for each coupling layer ``i`` a scale net
    ``s.i.{0,2,4}.weight/bias`` (Linear-SiLU-Linear-SiLU-Linear-Tanh) and a translation net
    ``t.i.{0,2,4}.weight/bias`` (the same without Tanh). Data is mapped to the latent space
    through the layers in reverse order,

    .. math:: z \leftarrow (1 - m_i) \odot (z - t_i(m_i z))\, e^{-s_i(m_i z)} + m_i z,\qquad
              \log|J| \mathrel{-}= \textstyle\sum s_i(m_i z) \odot (1 - m_i),

    and :math:`\log p(x) = -\tfrac12 \lVert z \rVert^2 - \log 2\pi + \log|J|`. The gradient flows
    to ``x`` and to every tensor of ``state`` (pass a module's parameters to train it).
    ``square_in_float32`` squares ``z`` in float32 as ultralytics does (its defence against
    overflow under AMP); off, everything is computed in ``x``'s dtype.
    """
    check_floating("x", x)
    if x.dim() != 2 or x.shape[1] != 2:
        raise ValueError(f"x: expected points of shape [N, 2], got {tuple(x.shape)}")
    if "mask" not in state:
        raise ValueError(f"state: expected a RealNVP state with 'mask', 's.<i>.<j>.weight', ...; got keys {sorted(state)[:6]}")
    dt = compute_dtype(x, *(t for t in state.values() if isinstance(t, torch.Tensor)))
    state = {k: upcast(v, dt) for k, v in state.items()}
    mask = state["mask"]
    z = upcast(x, dt)
    log_det = z.new_zeros(z.shape[0])
    for i in reversed(range(mask.shape[0])):
        m = mask[i]
        keep = m * z
        s = _coupling_net(keep, state, f"s.{i}", bounded=True) * (1 - m)
        t = _coupling_net(keep, state, f"t.{i}", bounded=False) * (1 - m)
        z = (1 - m) * (z - t) * torch.exp(-s) + keep
        log_det = log_det - s.sum(dim=1)
    sq = z.float() ** 2 if square_in_float32 else z ** 2
    return -0.5 * sq.sum(-1) - math.log(2 * math.pi) + log_det


def rle_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    sigma_logit: torch.Tensor,
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    weight: Optional[torch.Tensor] = None,
    residual: bool = True,
    reduction: str = "mean",
    sigma_in_float32: bool = False,
) -> torch.Tensor:
    r"""Residual log-likelihood estimation loss (RLE, Li et al. 2021) of keypoints ``[N, 2]``.

    With :math:`\sigma = \max(\mathrm{sigmoid}(\text{sigma\_logit}), \text{tiny})` ``[N, 2]``
    and the normalized error :math:`\bar e = \mathrm{clamp}((\hat\mu - \mu) / (\sigma + 10^{-9}), -100, 100)`,
    the loss of keypoint ``n`` is

    .. math:: \ell_n = w_n \sum_{d \in \{x, y\}} \Bigl[\log\sigma_d - \log\phi(\bar e)
              + \underbrace{\log 2\sigma_d + |\bar e_d|}_{\text{residual}}\Bigr]

    where :math:`\log\phi` = ``log_prob`` (the learned flow density, e.g. a
    :class:`detloss.nn.RealNVP`'s ``log_prob`` or :func:`realnvp_log_prob`; it maps ``[N, 2]``
    to ``[N]``) and the residual term is the Laplace prior of mmpose's ``RLELoss(residual=True)``.
    "mean" (the default, ultralytics' ``size_average``) divides the sum by ``N``; "none" gives
    ``[N]``. ``weight`` ``[N]``: per-keypoint weights (ultralytics' ``target_weights``). This is
    ultralytics 8.4 ``PoseLoss26.calculate_rle_loss`` + ``RLELoss`` before its final
    ``clamp(min=0)``; ``sigma_in_float32`` takes the sigmoid in float32 as ultralytics does.
    """
    check_reduction(reduction)
    for name, t in (("pred", pred), ("target", target), ("sigma_logit", sigma_logit)):
        check_floating(name, t)
        if t.dim() != 2 or t.shape[1] != 2 or t.shape[0] != pred.shape[0]:
            raise ValueError(f"{name}: expected shape [{pred.shape[0]}, 2] (x, y per keypoint), got {tuple(t.shape)}")
    if weight is not None:
        check_floating("weight", weight)
        if tuple(weight.shape) != (pred.shape[0],):
            raise ValueError(f"weight: expected shape ({pred.shape[0]},) (one per keypoint), got {tuple(weight.shape)}")
    dt = compute_dtype(pred, target, sigma_logit)
    logit = sigma_logit.float() if sigma_in_float32 else upcast(sigma_logit, dt)
    sigma = logit.sigmoid().clamp_min(torch.finfo(logit.dtype).tiny)
    error = ((upcast(pred, dt) - upcast(target, dt)) / (sigma + RLE_SIGMA_EPS)).clamp(-RLE_ERROR_CLAMP, RLE_ERROR_CLAMP)
    log_phi = log_prob(error)
    if not isinstance(log_phi, torch.Tensor) or tuple(log_phi.shape) != (pred.shape[0],):
        got = tuple(log_phi.shape) if isinstance(log_phi, torch.Tensor) else type(log_phi).__name__
        raise ValueError(f"log_prob: expected a callable returning shape ({pred.shape[0]},), got {got}")
    loss = torch.log(sigma) - log_phi[:, None]
    if residual:
        loss = loss + torch.log(sigma * 2) + error.abs()
    loss = loss.sum(-1)
    if weight is not None:
        loss = loss * weight
    return reduce(loss, reduction)
