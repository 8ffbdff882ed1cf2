"""The matching cost of the set-prediction losses (DETR, RT-DETR, D-FINE, DEIM): one cost matrix
worked out with its numbers, and the least-cost one-to-one assignment it gives.

Input: one row per query, its class logits followed by its box ``cx, cy, w, h`` (normalized);
target: one row per box, ``label, cx, cy, w, h``. The result is the ``[Q, n]`` cost matrix of
:meth:`detloss.HungarianMatcher.cost_terms` (``total``); the steps show the class probability
of each target's class, the class, L1 and GIoU costs and the pairs the solver picks.
"""
from __future__ import annotations

from typing import Dict

import torch

from .family import Spec
from .steps import Step

__all__ = ["SPECS", "ALIASES"]

OPTIONS = {"cost_class": 1.0, "cost_bbox": 1.0, "cost_giou": 1.0, "use_focal": False, "alpha": 0.25, "gamma": 2.0,
           "convention": "detr", "reduction": "none"}


def _split(x, y):
    if x.ndim != 2 or x.shape[1] < 5:
        raise ValueError(f"input: expected one row per query, class logits then cx, cy, w, h ([Q, C + 4], C >= 1), "
                         f"got {tuple(x.shape)}")
    if y.ndim == 1 and y.numel() == 5:
        y = y[None]
    if y.ndim != 2 or y.shape[1] != 5:
        raise ValueError(f"target: expected one row per box, label then cx, cy, w, h ([n, 5]), got {tuple(y.shape)}")
    return x[:, :-4], x[:, -4:], y[:, 0].round().long(), y[:, 1:]


def _matcher(o):
    from detloss import HungarianMatcher

    return HungarianMatcher(o["cost_class"], o["cost_bbox"], o["cost_giou"], use_focal=bool(o["use_focal"]),
                            alpha=o["alpha"], gamma=o["gamma"], convention=o["convention"])


def _terms(x, y, o):
    logits, boxes, labels, tboxes = _split(x, y)
    m = _matcher(o)
    outputs = {"pred_logits": logits[None], "pred_boxes": boxes[None]}
    targets = [{"labels": labels, "boxes": tboxes}]
    return m, outputs, targets, m.cost_terms(outputs, targets)[0]


def _call(x, y, o):
    return _terms(x, y, o)[3]["total"]


def _work(x, y, o, fmt):
    m, outputs, targets, t = _terms(x, y, o)
    logits, _, labels, _ = _split(x, y)
    p = torch.sigmoid(logits) if o["use_focal"] else torch.softmax(logits, -1)
    p_t = p[:, labels]
    (qi, ti), = m(outputs, targets)
    chosen = torch.zeros_like(t["total"])
    chosen[qi, ti] = 1
    lines = [f"query {q} -> box {j} (class {int(labels[j])}): cost {fmt(float(t['total'][q, j]))} = "
             f"{fmt(o['cost_bbox'])} * {fmt(float(t['bbox'][q, j]))} + {fmt(o['cost_class'])} * "
             f"{fmt(float(t['class'][q, j]))} + {fmt(o['cost_giou'])} * {fmt(float(t['giou'][q, j]))}"
             for q, j in zip(qi.tolist(), ti.tolist())]
    lines.append(f"total {fmt(float(t['total'][qi, ti].sum()))}, the least of every one-to-one assignment "
                 f"({min(p.shape[0], labels.numel())} pairs; scipy.optimize.linear_sum_assignment)")
    if o["use_focal"]:
        cls_formula = "alpha (1 - p_t)^gamma (-log(p_t + 1e-8)) - (1 - alpha) p_t^gamma (-log(1 - p_t + 1e-8))"
    else:
        cls_formula = "-p_t"
    giou = "1 - GIoU(b_q, b_t) (ultralytics' bbox_iou)" if o["convention"] == "ultralytics" else "-GIoU(b_q, b_t)"
    steps = [
        Step("p", "sigmoid(logits)" if o["use_focal"] else "softmax(logits) over the classes (the last is no-object)", p),
        Step("p_t", "p of each target's class, [query, box]", p_t),
        Step("c_class", cls_formula, t["class"]),
        Step("c_bbox", "|b_q - b_t|_1 over cx, cy, w, h", t["bbox"]),
        Step("c_giou", giou, t["giou"]),
        Step("C", f"{fmt(o['cost_bbox'])} c_bbox + {fmt(o['cost_class'])} c_class + {fmt(o['cost_giou'])} c_giou",
             t["total"]),
        Step("match", "the one-to-one assignment of least total cost (1 = pair)", chosen, details=lines),
    ]
    none = Step("dC/dinput", "none: the matching is computed without gradient; the loss then trains the matched "
                "pairs", torch.zeros_like(x))
    return {"steps": steps, "elementwise": t["total"], "gradient": none}


def _variants(call, x, y, o):
    out = [("the other class cost (" + ("softmax -p" if o["use_focal"] else "sigmoid focal") + ")",
            call(x, y, {**o, "use_focal": not o["use_focal"]}))]
    other = "ultralytics" if o["convention"] == "detr" else "detr"
    out.append((f"convention={other!r} (GIoU cost {'1 - GIoU' if other == 'ultralytics' else '-GIoU'})",
                call(x, y, {**o, "convention": other})))
    for k in ("cost_class", "cost_bbox", "cost_giou"):
        if o[k]:
            out.append((f"without the {k[5:]} cost ({k}=0)", call(x, y, {**o, k: 0.0})))
    return out


SPECS: Dict[str, Spec] = {
    "matching-cost": Spec(
        "detloss.HungarianMatcher.cost_terms",
        "C[q, t] = cost_bbox |b_q - b_t|_1 + cost_class c_class(p_q[label_t]) + cost_giou c_giou(b_q, b_t)",
        "Carion et al. 2020 (DETR) models/matcher.py; RT-DETR / D-FINE / DEIM focal class cost; ultralytics ops.py",
        OPTIONS, _work, _call, variants=_variants, input_names=("queries", "boxes"),
    ),
}
ALIASES = {"hungarian": ("matching-cost", {}), "detr-matching": ("matching-cost", {"cost_bbox": 5.0, "cost_giou": 2.0}),
           "rtdetr-matching": ("matching-cost", {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0,
                                                 "use_focal": True})}
