"""Softmax cross-entropy: class indices or soft targets, class weights, ignore_index, label smoothing."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from .family import Spec, functional_loss, reduction_variants
from .steps import Step, per_element

__all__ = ["SPECS", "ALIASES"]


def _ce_soft(x: torch.Tensor, y: torch.Tensor) -> bool:
    """Soft (probability) targets when the target has the logits' shape; class indices otherwise."""
    return y.shape == x.shape and y.is_floating_point()


def _work_cross_entropy(x, y, o, fmt):
    # x: [N, C] logits (a single row [C] is made [1, C] by explain()).
    soft = _ce_soft(x, y)
    eps = float(o.get("label_smoothing") or 0.0)
    w = o.get("weight")
    ignore = int(o["ignore_index"]) if o.get("ignore_index") is not None else -100
    N, C = x.shape
    m = x.max(-1, keepdim=True).values
    lse = m + torch.log(torch.exp(x - m).sum(-1, keepdim=True))
    logq = x - lse
    q = torch.exp(logq)
    wc = torch.ones(C, dtype=x.dtype) if w is None else w
    if soft:
        t = y
        valid = torch.ones(N, dtype=torch.bool)
    else:
        yi = y.long().reshape(-1)
        valid = yi != ignore
        bad = valid & ((yi < 0) | (yi >= C))
        if bool(bad.any()):
            k = int(torch.nonzero(bad)[0])
            raise ValueError(f"target: expected class indices in [0, {C - 1}] (or ignore_index {ignore}), "
                             f"got {int(yi[k])} at row {k}")
        t = F.one_hot(yi.clamp(0, C - 1), C).to(x.dtype) * valid[:, None]
    ts = t * (1 - eps) + eps / C * valid[:, None].to(x.dtype)
    elem = -(ts * wc * logq).sum(-1) * valid
    if soft:
        divisor = None
    elif w is not None:
        divisor = float((wc[yi.clamp(0, C - 1)] * valid).sum())
    else:
        divisor = None if bool(valid.all()) else float(valid.sum())
    steps = [
        Step("m", "max_c x_c (subtracted for stability)", m.squeeze(-1)),
        Step("lse", "m + log(sum_c exp(x_c - m))  (log-sum-exp)", lse.squeeze(-1)),
        Step("log q", "x - lse  (log-softmax)", logq),
        Step("q", "softmax(x) = exp(log q)", q),
    ]
    if soft:
        steps.append(Step("t", "the target distribution as given (soft targets)", t))
    else:
        steps.append(Step("t", "one-hot of the class index"
                          + ("" if bool(valid.all()) else f" (rows with target {ignore} are ignored)"), t))
    if eps:
        steps.append(Step("t'", f"(1 - eps) * t + eps / C with eps={fmt(eps)}, C={C}  (label smoothing)", ts))
    tn = "t'" if eps else "t"

    def detail(i):
        if not bool(valid[i]):
            return f"ignored (target {ignore}) = 0"
        if not soft and not eps:
            c = int(yi[i])
            pre = "" if w is None else f"{fmt(float(wc[c]))} * "
            return f"y={c}: l = {pre}-log q_{c} = {pre}-({fmt(float(logq[i, c]))}) = {fmt(float(elem[i]))}"
        terms = " + ".join(f"{fmt(float(ts[i, c]))} * ({fmt(float(logq[i, c]))})" for c in range(C) if float(ts[i, c]) != 0)
        return f"l = -[{terms}] = {fmt(float(elem[i]))}"

    steps.append(Step("l", ("-sum_c w_c * " if w is not None else "-sum_c ") + f"{tn}_c * log q_c", elem,
                      per_element(torch.Size([N]), detail)))
    o["_divisor"] = divisor
    n = 1.0
    if o["reduction"] == "mean":
        n = divisor if divisor is not None else float(N)
    grad = None
    if w is None:
        gr = (q * ts.sum(-1, keepdim=True) - ts) * valid[:, None] / n
        grad = Step("dL/dx", "(softmax(x) * sum_c t_c - t)" + (" / n" if n != 1 else ""), gr)
    return {"steps": steps, "elementwise": elem, "gradient": grad}


def _call_cross_entropy(x, y, o):
    soft = _ce_soft(x, y)
    kw = {k: o[k] for k in ("weight", "label_smoothing", "reduction") if o.get(k) is not None}
    if o.get("ignore_index") is not None:
        kw["ignore_index"] = int(o["ignore_index"])
    tgt = y if soft else y.long()
    return functional_loss("cross_entropy")(x, tgt, **kw)


def _v_cross_entropy(call, x, y, o):
    v = reduction_variants(call, x, y, o)
    if o.get("label_smoothing"):
        v.append(("no label smoothing", call(x, y, {**o, "label_smoothing": 0.0})))
    x2 = x
    v.append(("softmax probabilities q (no log taken)", torch.softmax(x, -1)))
    soft = _ce_soft(x, y)
    if not soft and torch.all((x >= 0) & (x <= 1)):
        yi = y.long().reshape(-1)
        v.append(("-log of the input read as a probability (no softmax)", -torch.log(x2[torch.arange(x2.shape[0]), yi.clamp(min=0)].clamp(min=1e-12))))
    if not soft:
        bce = functional_loss("bce_with_logits")
        onehot = F.one_hot(y.long().reshape(-1).clamp(min=0), x2.shape[-1]).to(x.dtype)
        v.append(("sigmoid BCE over the classes (one-hot target) instead of softmax cross-entropy",
                  bce(x2, onehot, reduction="none").sum(-1)))
        v.append(("sigmoid BCE over the classes, mean over all elements", bce(x2, onehot, reduction="mean")))
    return v


SPECS: Dict[str, Spec] = {
    "cross-entropy": Spec(
        "detloss.functional.cross_entropy", "l = -sum_c t_c log softmax(x)_c (t: one-hot, smoothed or soft target)",
        "torch.nn.functional.cross_entropy; label smoothing: Szegedy et al. 2016 (Inception v3)",
        {"weight": None, "ignore_index": -100, "label_smoothing": 0.0, "reduction": "mean"}, _work_cross_entropy,
        _call_cross_entropy, target_kind="index-or-soft", variants=_v_cross_entropy,
        input_rows=True, soft_target=True, input_names=("x", "target")),
}
ALIASES = {}
