"""The focal family: sigmoid focal, softmax focal, quality focal (GFL) and varifocal."""
from __future__ import annotations

from typing import Dict

import torch

from .family import (
    Spec, flip_and_reduction_variants, flip_variants, functional_loss, generic_call, log_sigmoid,
    reduction_variants,
)
from .steps import Step, per_element

__all__ = ["SPECS", "ALIASES"]


def _work_sigmoid_focal(x, y, o, fmt):
    alpha, gamma = float(o["alpha"]), float(o["gamma"])
    p = torch.sigmoid(x)
    ce = -(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x))
    pt = p * y + (1 - p) * (1 - y)
    mod = (1 - pt) ** gamma
    at = alpha * y + (1 - alpha) * (1 - y) if alpha >= 0 else torch.ones_like(x)
    elem = at * mod * ce
    fy, fp, fpt, fat, fm, fc, fe = (t.reshape(-1) for t in (y, p, pt, at, mod, ce, elem))

    def detail(i):
        return (f"y={fmt(float(fy[i]))}: {fmt(float(fat[i]))} * {fmt(float(fm[i]))} * {fmt(float(fc[i]))}"
                f" = {fmt(float(fe[i]))}")

    steps = [
        Step("p", "sigmoid(x)", p),
        Step("ce", "-[y * log(p) + (1 - y) * log(1 - p)]  (BCE with logits)", ce),
        Step("p_t", "p * y + (1 - p) * (1 - y)  (probability of the true label)", pt),
        Step("alpha_t", (f"alpha * y + (1 - alpha) * (1 - y), alpha={fmt(alpha)}" if alpha >= 0 else "1 (alpha < 0: no class weighting)"), at),
        Step("(1 - p_t)^gamma", f"modulating factor, gamma={fmt(gamma)}", mod),
        Step("l", "alpha_t * (1 - p_t)^gamma * ce", elem, per_element(x.shape, detail)),
    ]
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _v_focal(call, x, y, o):
    branches = ("a target-1 element computed with the target-0 formula -(1 - alpha) * p^gamma * log(1 - p), "
                "or a target-0 element with the target-1 formula -alpha * (1 - p)^gamma * log(p)")
    v = flip_variants(call, x, y, o, branches) + reduction_variants(call, x, y, o)
    if float(o["alpha"]) >= 0:
        v.append(("no alpha weighting (alpha = -1)", call(x, y, {**o, "alpha": -1.0})))
        v.append(("alpha and 1 - alpha swapped", call(x, y, {**o, "alpha": 1 - float(o["alpha"])})))
    v.append(("no modulating factor (gamma = 0: alpha-weighted BCE)", call(x, y, {**o, "gamma": 0.0})))
    v.append(("plain BCE with logits (no alpha, gamma = 0)", call(x, y, {**o, "gamma": 0.0, "alpha": -1.0})))
    npos = float((y > 0).sum())
    if npos > 0:
        v.append(("the summed loss divided by the number of positives",
                  call(x, y, {**o, "reduction": "sum"}) / npos))
    if torch.all((x > 0) & (x < 1)):
        logit = torch.log(x) - torch.log1p(-x)
        v.append(("the input read as a probability (no sigmoid)", call(logit, y, o)))
    return v


def _work_softmax_focal(x, y, o, fmt):
    # x: [N, C] logits, y: [N] class indices (explain() makes a single row 2-D).
    alpha, gamma = float(o["alpha"]), float(o["gamma"])
    w = o.get("weight")
    ignore = int(o["ignore_index"]) if o.get("ignore_index") is not None else -100
    N, C = x.shape
    yi = y.long().reshape(-1)
    valid = yi != ignore
    safe = torch.where(valid, yi, torch.zeros_like(yi)).clamp(0, C - 1)
    logq = torch.log_softmax(x, -1)
    logp_y = logq[torch.arange(N), safe]
    p_y = logp_y.exp()
    mod = (1 - p_y).clamp(min=0) ** gamma
    w_t = valid.to(x.dtype) if w is None else w[safe] * valid
    elem = -alpha * mod * logp_y * w_t
    o["_divisor"] = float(w_t.sum()) if not bool(valid.all()) or w is not None else None
    steps = [
        Step("log q", "log_softmax(x)", logq),
        Step("p_y", "softmax(x) at the target class", p_y),
        Step("(1 - p_y)^gamma", f"modulating factor, gamma={fmt(gamma)}", mod),
        Step("l", f"-alpha * {'w_y * ' if w is not None else ''}(1 - p_y)^gamma * log p_y, alpha={fmt(alpha)}", elem),
    ]
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _call_softmax_focal(x, y, o):
    kw = {k: o[k] for k in ("weight", "alpha", "gamma", "reduction") if o.get(k) is not None}
    if o.get("ignore_index") is not None:
        kw["ignore_index"] = int(o["ignore_index"])
    return functional_loss("softmax_focal_loss")(x, y.long(), **kw)


def _work_qfl(x, y, o, fmt):
    gamma, alpha = float(o["gamma"]), o.get("alpha")
    p = torch.sigmoid(x)
    ce = -(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x))
    mod = (y - p).abs() ** gamma
    steps = [Step("p", "sigmoid(x)", p), Step("ce", "-[y * log(p) + (1 - y) * log(1 - p)]  (y is the soft IoU-quality target)", ce),
             Step("|y - p|^gamma", f"modulating factor, gamma={fmt(gamma)}", mod)]
    elem = ce * mod
    if alpha is not None:
        af = y * float(alpha) + (1 - y) * (1 - float(alpha))
        steps.append(Step("alpha_t", f"y * alpha + (1 - y) * (1 - alpha), alpha={fmt(float(alpha))}", af))
        elem = elem * af
    steps.append(Step("l", ("alpha_t * " if alpha is not None else "") + "|y - p|^gamma * ce", elem))
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _work_varifocal(x, y, o, fmt):
    label = o["label"]
    alpha, gamma = float(o["alpha"]), float(o["gamma"])
    p = torch.sigmoid(x)
    ce = -(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x))
    weight = alpha * p ** gamma * (1 - label) + y * label
    elem = ce * weight
    steps = [
        Step("p", "sigmoid(x)", p),
        Step("ce", "BCE with logits against the target score q: -[q * log(p) + (1 - q) * log(1 - p)]", ce),
        Step("w", f"alpha * p^gamma * (1 - label) + q * label, alpha={fmt(alpha)}, gamma={fmt(gamma)}", weight,
             note="negatives are down-weighted by p^gamma, positives weighted by their IoU-aware score q"),
        Step("l", "w * ce", elem),
    ]
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _call_varifocal(x, y, o):
    return functional_loss("varifocal_loss")(x, y, o["label"], alpha=o["alpha"], gamma=o["gamma"], reduction=o["reduction"])


def _v_gamma(call, x, y, o):
    v = flip_and_reduction_variants(call, x, y, o)
    if "gamma" in o:
        v.append(("no modulating factor (gamma = 0)", call(x, y, {**o, "gamma": 0.0})))
    return v


def _v_gamma_only(call, x, y, o):
    return reduction_variants(call, x, y, o) + [("no modulating factor (gamma = 0)", call(x, y, {**o, "gamma": 0.0}))]


SPECS: Dict[str, Spec] = {
    "focal": Spec(
        "detloss.functional.sigmoid_focal_loss", "l = alpha_t (1 - p_t)^gamma * BCE(x, y)",
        "Lin et al. 2017, Focal Loss for Dense Object Detection; torchvision.ops.sigmoid_focal_loss",
        {"alpha": 0.25, "gamma": 2.0, "reduction": "none"}, _work_sigmoid_focal,
        generic_call("sigmoid_focal_loss", ("alpha", "gamma", "reduction")), variants=_v_focal),
    "softmax-focal": Spec(
        "detloss.functional.softmax_focal_loss", "l = -alpha w_y (1 - p_y)^gamma log p_y, p = softmax(x)",
        "Lin et al. 2017, Focal Loss (multi-class form); mmcv softmax_focal_loss",
        {"weight": None, "alpha": 0.25, "gamma": 2.0, "ignore_index": -100, "reduction": "mean"},
        _work_softmax_focal, _call_softmax_focal, target_kind="index-or-soft", variants=_v_gamma_only,
        input_rows=True),
    "qfl": Spec(
        "detloss.functional.quality_focal_loss", "l = |y - sigmoid(x)|^gamma * BCE(x, y) [* alpha_t]",
        "Li et al. 2020, Generalized Focal Loss; YOLOv5 utils/loss.py QFocalLoss", {"gamma": 2.0, "alpha": None, "reduction": "mean"},
        _work_qfl, generic_call("quality_focal_loss", ("gamma", "alpha", "reduction")), variants=_v_gamma),
    "varifocal": Spec(
        "detloss.functional.varifocal_loss", "l = [alpha p^gamma (1 - label) + q label] * BCE(x, q)",
        "Zhang et al. 2021, VarifocalNet; ultralytics utils/loss.py VarifocalLoss",
        {"label": None, "alpha": 0.75, "gamma": 2.0, "reduction": "mean"}, _work_varifocal, _call_varifocal,
        variants=_v_gamma,
        requires={"label": "the 0/1 label of every element (--label)"}),
}
ALIASES = {"sigmoid-focal": ("focal", {}), "quality-focal": ("qfl", {}), "vfl": ("varifocal", {})}
