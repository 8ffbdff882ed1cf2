"""The binary cross-entropy family: bce-with-logits, bce (on probabilities) and YOLOv5's bce-blur."""
from __future__ import annotations

from typing import Dict

import torch

from .family import (
    Spec, divisor_count, flip_and_reduction_variants, flip_variants, functional_loss, generic_call,
    log_sigmoid, reduction_variants,
)
from .steps import Step, per_element

__all__ = ["SPECS", "ALIASES"]


_BCE_SRC = "torch.nn.functional.binary_cross_entropy(_with_logits)"


def _work_bce_with_logits(x, y, o, fmt):
    w, pw = o.get("weight"), o.get("pos_weight")
    p = torch.sigmoid(x)
    logp, log1mp = log_sigmoid(x), log_sigmoid(-x)
    pwt = torch.ones_like(x) if pw is None else torch.as_tensor(pw, dtype=x.dtype).expand_as(x)
    wt = torch.ones_like(x) if w is None else torch.as_tensor(w, dtype=x.dtype).expand_as(x)
    term = -(pwt * y * logp + (1 - y) * log1mp)
    elem = wt * term
    fy, fp, fe, fw, fpw = y.reshape(-1), p.reshape(-1), elem.reshape(-1), wt.reshape(-1), pwt.reshape(-1)

    def detail(i):
        a, b = float(fy[i]), float(fp[i])
        pre = "" if w is None else f"{fmt(float(fw[i]))} * "
        pws = "" if pw is None else f"{fmt(float(fpw[i]))} * "
        if a == 1:
            s = f"y=1: l = -{pws}log(p) = {pre}-{pws}log({fmt(b)})"
        elif a == 0:
            s = f"y=0: l = -log(1 - p) = {pre}-log(1 - {fmt(b)})"
        else:
            s = f"y={fmt(a)}: l = {pre}-[{pws}{fmt(a)} * log({fmt(b)}) + {fmt(1 - a)} * log(1 - {fmt(b)})]"
        return f"{s} = {fmt(float(fe[i]))}"

    steps = [
        Step("p", "sigmoid(x) = 1 / (1 + exp(-x))", p),
        Step(
            "l",
            ("w * " if w is not None else "")
            + ("-[pos_weight * y * log(p) + (1 - y) * log(1 - p)]" if pw is not None else "-[y * log(p) + (1 - y) * log(1 - p)]"),
            elem,
            per_element(x.shape, detail),
            note="log(p) is computed as -softplus(-x), stable for any logit",
        ),
    ]
    n = divisor_count(elem, o)
    grad = wt * (p * (pwt * y + 1 - y) - pwt * y) / n
    gtxt = ("w * " if w is not None else "") + (
        "(p * (pos_weight * y + 1 - y) - pos_weight * y)" if pw is not None else "(p - y)"
    ) + (" / n" if o["reduction"] == "mean" else "")
    fg = grad.reshape(-1)
    gdetails = per_element(x.shape, lambda i: f"({fmt(float(fp[i]))} - {fmt(float(fy[i]))}){' / ' + fmt(n) if n != 1 else ''} = {fmt(float(fg[i]))}") if pw is None and w is None else None
    return {"steps": steps, "elementwise": elem, "gradient": Step("dL/dx", gtxt, grad, gdetails)}


def _work_bce(x, y, o, fmt):
    w = o.get("weight")
    wt = torch.ones_like(x) if w is None else torch.as_tensor(w, dtype=x.dtype).expand_as(x)
    logp = torch.log(x).clamp(min=-100)
    log1mp = torch.log1p(-x).clamp(min=-100)
    elem = -wt * (y * logp + (1 - y) * log1mp)
    fy, fx, fe = y.reshape(-1), x.reshape(-1), elem.reshape(-1)

    def detail(i):
        a, b = float(fy[i]), float(fx[i])
        if a == 1:
            s = f"y=1: l = -log(p) = -log({fmt(b)})"
        elif a == 0:
            s = f"y=0: l = -log(1 - p) = -log(1 - {fmt(b)})"
        else:
            s = f"y={fmt(a)}: l = -[{fmt(a)} * log({fmt(b)}) + {fmt(1 - a)} * log(1 - {fmt(b)})]"
        return f"{s} = {fmt(float(fe[i]))}"

    steps = [
        Step("log p, log(1-p)", "natural logs of the probabilities, each clamped at -100 (as torch does)",
             torch.stack((logp, log1mp), -1)),
        Step("l", ("w * " if w is not None else "") + "-[y * log(p) + (1 - y) * log(1 - p)]", elem, per_element(x.shape, detail)),
    ]
    n = divisor_count(elem, o)
    grad = wt * (x - y) / (x * (1 - x)).clamp(min=1e-12) / n
    return {"steps": steps, "elementwise": elem,
            "gradient": Step("dL/dp", ("w * " if w is not None else "") + "(p - y) / (p * (1 - p))" + (" / n" if n != 1 else ""), grad)}


def _v_bce_with_logits(call, x, y, o):
    v = flip_variants(call, x, y, o, "-log(1 - p) where y = 1, -log(p) where y = 0") + reduction_variants(call, x, y, o)
    if torch.all((x >= 0) & (x <= 1)):
        bce = functional_loss("binary_cross_entropy")
        v.append(("the input read as probabilities (binary_cross_entropy, no sigmoid)",
                  bce(x, y, reduction=o["reduction"])))
    return v


def _v_bce(call, x, y, o):
    v = flip_variants(call, x, y, o) + reduction_variants(call, x, y, o)
    v.append(("the input read as logits (bce_with_logits)", functional_loss("bce_with_logits")(x, y, reduction=o["reduction"])))
    return v


def _work_bce_blur(x, y, o, fmt):
    alpha = float(o["alpha"])
    p = torch.sigmoid(x)
    ce = -(y * log_sigmoid(x) + (1 - y) * log_sigmoid(-x))
    dx = p - y
    af = 1 - torch.exp((dx - 1) / (alpha + 1e-4))
    elem = ce * af
    steps = [
        Step("p", "sigmoid(x)", p),
        Step("ce", "-[y * log(p) + (1 - y) * log(1 - p)]", ce),
        Step("dx", "p - y", dx),
        Step("alpha_factor", f"1 - exp((dx - 1) / (alpha + 1e-4)), alpha={fmt(alpha)}  (damps false negatives from missing labels)", af),
        Step("l", "alpha_factor * ce", elem),
    ]
    return {"steps": steps, "elementwise": elem, "gradient": None}




SPECS: Dict[str, Spec] = {
    "bce-with-logits": Spec(
        "detloss.functional.bce_with_logits", "l = -w [pos_weight * y log sigmoid(x) + (1 - y) log(1 - sigmoid(x))]",
        _BCE_SRC, {"weight": None, "pos_weight": None, "reduction": "mean"}, _work_bce_with_logits,
        generic_call("bce_with_logits", ("weight", "pos_weight", "reduction")), variants=_v_bce_with_logits),
    "bce": Spec(
        "detloss.functional.binary_cross_entropy", "l = -w [y log p + (1 - y) log(1 - p)], logs clamped at -100",
        _BCE_SRC, {"weight": None, "reduction": "mean"}, _work_bce,
        generic_call("binary_cross_entropy", ("weight", "reduction")), variants=_v_bce,
        input_names=("p", "y")),
    "bce-blur": Spec(
        "detloss.functional.bce_blur", "l = BCE(x, y) * (1 - exp((sigmoid(x) - y - 1) / (alpha + 1e-4))), mean",
        "YOLOv5 utils/loss.py BCEBlurWithLogitsLoss", {"alpha": 0.05, "reduction": "mean"}, _work_bce_blur,
        generic_call("bce_blur", ("alpha",)), variants=flip_and_reduction_variants),
}
ALIASES = {"binary-cross-entropy": ("bce", {})}
