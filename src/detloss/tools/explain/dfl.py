"""Distribution focal loss (GFL / ultralytics DFLoss): the two bins around a continuous target."""
from __future__ import annotations

from typing import Dict

import torch

from .family import Spec, functional_loss, reduction_variants
from .steps import Step, per_element

__all__ = ["SPECS", "ALIASES"]


def _work_dfl(x, y, o, fmt):
    # x: [n, bins] logits, y: [n] targets in [0, bins - 1] (explain() makes a single row 2-D).
    nb = x.shape[-1]
    left = y.floor().long().clamp(0, nb - 1)
    right = (left + 1).clamp(max=nb - 1)
    wl = (left + 1).to(x.dtype) - y
    wr = y - left.to(x.dtype)
    logq = torch.log_softmax(x, -1)
    rows = torch.arange(x.shape[0])
    lq_l, lq_r = logq[rows, left], logq[rows, right]
    elem = -(wl * lq_l + wr * lq_r)

    def detail(i):
        return (f"t={fmt(float(y[i]))}: -[{fmt(float(wl[i]))} * ({fmt(float(lq_l[i]))}) + "
                f"{fmt(float(wr[i]))} * ({fmt(float(lq_r[i]))})] = {fmt(float(elem[i]))}")

    steps = [
        Step("log q", "log_softmax over the bins", logq),
        Step("i, i+1", "the two bins around the target: i = floor(t)", torch.stack((left, left + 1), -1).to(x.dtype)),
        Step("w_left, w_right", "(i + 1 - t, t - i)", torch.stack((wl, wr), -1)),
        Step("l", "-[w_left * log q_i + w_right * log q_(i+1)]", elem, per_element(torch.Size([x.shape[0]]), detail)),
    ]
    return {"steps": steps, "elementwise": elem, "gradient": None}


def _call_dfl(x, y, o):
    return functional_loss("distribution_focal_loss")(x, y, reduction=o["reduction"])


SPECS: Dict[str, Spec] = {
    "dfl": Spec(
        "detloss.functional.distribution_focal_loss", "l = -[(i + 1 - t) log q_i + (t - i) log q_(i+1)], i = floor(t)",
        "Li et al. 2020, Generalized Focal Loss (DFL); ultralytics DFLoss", {"reduction": "mean"}, _work_dfl, _call_dfl,
        variants=reduction_variants,
        input_rows=True, input_names=("logits", "target t")),
}
ALIASES = {"distribution-focal": ("dfl", {})}
