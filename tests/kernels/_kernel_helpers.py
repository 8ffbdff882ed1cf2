"""Shared helpers: run a fused loss and its plain autograd formula on the same input."""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch


def loss_and_grad(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, grad_output: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``fn(x)`` and the gradient of ``(fn(x) * grad_output).sum()`` with respect to ``x``."""
    xr = x.detach().clone().requires_grad_(True)
    loss = fn(xr)
    go = torch.ones_like(loss) if grad_output is None else grad_output
    loss.backward(go)
    return loss.detach(), xr.grad


def assert_parity(fused, formula, x, grad_output=None, rtol=1e-10, atol=1e-12):
    """Loss and gradient of the fused path equal the formula's."""
    lf, gf = loss_and_grad(fused, x, grad_output)
    lr, gr = loss_and_grad(formula, x, grad_output)
    assert lf.shape == lr.shape and lf.dtype == lr.dtype
    assert gf.shape == gr.shape and gf.dtype == gr.dtype == x.dtype
    assert torch.isfinite(lf).all() and torch.isfinite(gf).all()
    torch.testing.assert_close(lf, lr, rtol=rtol, atol=atol)
    torch.testing.assert_close(gf, gr, rtol=rtol, atol=atol)
    return lf, gf


# The formulas of detloss.kernels.dense (the losses as their originals write them, autograd
# throughout), with the pass's reduction: the ground truth the closed forms are compared with.
def _formula(name, reduction, **params):
    from detloss.kernels import dense
    from detloss.kernels._runtime import make_formula

    return make_formula(dense.FORMULAS[name], reduction, **params)


def bce_formula(x, t, weight=None, pos_weight=None, reduction="mean"):
    return _formula("bce_with_logits", reduction)(x, t, weight, pos_weight)


def focal_formula(x, t, alpha=0.25, gamma=2.0, reduction="none", pos_weight=None):
    return _formula("sigmoid_focal_loss", reduction, alpha=alpha, gamma=gamma)(x, t, pos_weight)


def qfl_formula(x, t, gamma=2.0, alpha=None, reduction="mean"):
    return _formula("quality_focal_loss", reduction, gamma=gamma, alpha=alpha)(x, t)


def vfl_formula(x, score, label, alpha=0.75, gamma=2.0, reduction="mean"):
    return _formula("varifocal_loss", reduction, alpha=alpha, gamma=gamma)(x, score, label)


def blur_formula(x, t, alpha=0.05, reduction="mean"):
    from detloss.kernels.dense import BLUR_EPS

    return _formula("bce_blur", reduction, alpha=alpha, eps=BLUR_EPS)(x, t)
