"""Element-wise regression losses: smooth L1, L1, MSE."""
from __future__ import annotations

from typing import Dict

import torch

from .family import Spec, divisor_count, functional_loss, generic_call, reduction_variants
from .steps import Step, per_element

__all__ = ["SPECS", "ALIASES"]


def _work_smooth_l1(x, y, o, fmt):
    beta = float(o["beta"])
    d = (x - y).abs()
    quad = d < beta
    elem = torch.where(quad, 0.5 * d ** 2 / beta if beta > 0 else d, d - 0.5 * beta)
    fd, fq, fe = d.reshape(-1), quad.reshape(-1), elem.reshape(-1)

    def detail(i):
        if bool(fq[i]):
            return f"|d|={fmt(float(fd[i]))} < beta: 0.5 * d^2 / beta = {fmt(float(fe[i]))}"
        return f"|d|={fmt(float(fd[i]))} >= beta: |d| - 0.5 * beta = {fmt(float(fe[i]))}"

    steps = [Step("|d|", "|x - y|", d),
             Step("l", f"0.5 * d^2 / beta if |d| < beta else |d| - 0.5 * beta  (beta={fmt(beta)})", elem,
                  per_element(x.shape, detail))]
    n = divisor_count(elem, o)
    g = torch.where(quad, (x - y) / beta if beta > 0 else torch.sign(x - y), torch.sign(x - y)) / n
    return {"steps": steps, "elementwise": elem,
            "gradient": Step("dL/dx", "[(x - y) / beta in the quadratic branch, sign(x - y) in the linear one]" + (" / n" if n != 1 else ""), g)}


def _v_smooth_l1(call, x, y, o):
    v = reduction_variants(call, x, y, o)
    v.append(("the L1 loss |x - y|", functional_loss("l1_loss")(x, y, reduction=o["reduction"])))
    v.append(("the quadratic branch everywhere, 0.5 * d^2 / beta",
              _reduce_simple(0.5 * (x - y) ** 2 / max(float(o["beta"]), 1e-12), o["reduction"])))
    v.append(("the Huber loss (beta * smooth L1)", call(x, y, o) * float(o["beta"])))
    if float(o["beta"]) != 1.0:
        v.append(("beta = 1 (the default)", call(x, y, {**o, "beta": 1.0})))
    return v


def _reduce_simple(t, reduction):
    return t if reduction == "none" else (t.sum() if reduction == "sum" else t.mean())


def _work_l1(x, y, o, fmt):
    d = x - y
    elem = d.abs()
    n = divisor_count(elem, o)
    return {"steps": [Step("d", "x - y", d), Step("l", "|d|", elem)], "elementwise": elem,
            "gradient": Step("dL/dx", "sign(x - y)" + (" / n" if n != 1 else ""), torch.sign(d) / n)}


def _work_mse(x, y, o, fmt):
    d = x - y
    elem = d ** 2
    n = divisor_count(elem, o)
    return {"steps": [Step("d", "x - y", d), Step("l", "d^2", elem)], "elementwise": elem,
            "gradient": Step("dL/dx", "2 * (x - y)" + (" / n" if n != 1 else ""), 2 * d / n)}


def _v_regression(call, x, y, o):
    v = reduction_variants(call, x, y, o)
    v.append(("the L1 loss", functional_loss("l1_loss")(x, y, reduction=o["reduction"])))
    v.append(("the squared error (MSE)", functional_loss("mse_loss")(x, y, reduction=o["reduction"])))
    v.append(("the root of the mean squared error", functional_loss("mse_loss")(x, y, reduction="mean").sqrt()))
    v.append(("half the squared error", 0.5 * functional_loss("mse_loss")(x, y, reduction=o["reduction"])))
    return v


SPECS: Dict[str, Spec] = {
    "smooth-l1": Spec(
        "detloss.functional.smooth_l1_loss", "l = 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta, d = x - y",
        "Girshick 2015, Fast R-CNN; torch.nn.functional.smooth_l1_loss", {"beta": 1.0, "reduction": "mean"},
        _work_smooth_l1, generic_call("smooth_l1_loss", ("beta", "reduction")), variants=_v_smooth_l1),
    "l1": Spec("detloss.functional.l1_loss", "l = |x - y|", "torch.nn.functional.l1_loss", {"reduction": "mean"},
                _work_l1, generic_call("l1_loss", ("reduction",)), variants=_v_regression),
    "mse": Spec("detloss.functional.mse_loss", "l = (x - y)^2", "torch.nn.functional.mse_loss", {"reduction": "mean"},
                 _work_mse, generic_call("mse_loss", ("reduction",)), variants=_v_regression),
}
ALIASES = {"smooth_l1": ("smooth-l1", {})}
