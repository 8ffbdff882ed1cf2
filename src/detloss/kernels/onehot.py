r"""Fused BCE-with-logits against one-hot soft targets given per row: the class term of the
task-aligned YOLO losses (ultralytics ``v8DetectionLoss``: BCE of every class logit against
``target_scores``, which is 0 except at one class per positive anchor).

Logits ``x [B, K, N]`` (channel ``k`` of row ``n`` of image ``b``), the target of each row given
by a class ``label [B, 1, N]`` and a ``score [B, 1, N]``, and per channel its class ``chan
[1, K, 1]`` and weight ``w [1, K, 1]``:

.. math::
    y_{bkn} = \begin{cases} s_{bn} & \mathrm{chan}_k = l_{bn} \\ 0 & \text{otherwise}\end{cases},
    \qquad \ell = \sum_{bkn} w_k\,\mathrm{BCE}(x_{bkn}, y_{bkn}),
    \qquad \frac{\partial \ell}{\partial x_{bkn}} = c\,w_k\,\frac{\partial\,\mathrm{BCE}}{\partial x}

with BCE and its derivative the closed form of :func:`detloss.kernels.dense.bce_with_logits_closed_form`
(the branches of :func:`detloss.functional.bce_with_logits`, so the value and the gradient are
those of the dense target ``y`` to rounding) and ``c`` a scale of the gradient only. The dense
target ``[B, K, N]`` is never built: each element compares its channel's class with its row's
label. Channels that are not classes (``chan = -1``, ``w = 0``: the box channels of a head map
``[B, 4 * reg_max + nc, H * W]``) get loss 0 and gradient 0, so one pass over a whole head map
writes its whole gradient, zeros included.

:func:`fused_onehot_bce_with_logits` is the differentiable loss (the fused path of
:mod:`detloss.kernels`: compiled once, only the gradient kept for backward);
:func:`onehot_bce_into` runs the same pass and stores the gradient into a given buffer, the
caller owning the autograd (the YOLO losses write it straight into the gradient of their head
maps). The tensors are validated by the caller.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._runtime import LossPass, apply_pass, cached_pass
from .dense import bce_with_logits_closed_form, bce_with_logits_formula, dense_pass_options

__all__ = [
    "onehot_bce_closed_form", "onehot_bce_formula", "onehot_bce_pass", "onehot_bce_into", "fused_onehot_bce_with_logits",
]


def onehot_bce_closed_form(x: Tensor, label: Tensor, score: Tensor, chan: Tensor, weight: Tensor, scale: Tensor) -> Tuple[Tensor, Tensor]:
    """Elementwise BCE-with-logits of ``x`` against the one-hot target of its row (module
    docstring) times ``weight``, and its derivative in ``x`` times ``scale``.

    Compiled on logits of 3 or more dimensions, ``x`` first becomes ``x + 0 * label`` (the same
    values; ``-0.0`` becomes ``+0.0``, whose loss and gradient are the same): every subexpression
    of ``x`` alone then has the loop shape of the label's broadcast, so Inductor fuses the whole
    pass into one loop. Without it, on ``[B, K, N]`` logits with ``[B, 1, N]`` labels, it collapsed
    the dimensions of the ``x``-only part differently and stored ``exp(-|x|)`` and the gradient in
    two input-sized buffers before writing ``out`` (8 MB more, and 1.7x the time, on YOLOv8's
    batch-8 320 px level 0). 2-d logits ``[P, K]`` with ``[P, 1]`` labels fuse into one loop
    without it (checked in Inductor's output), and the added operation only costs there."""
    if torch.compiler.is_compiling() and x.dim() >= 3:
        x = x + label * 0.0
    y = torch.where(chan == label, score, 0.0)
    loss, grad = bce_with_logits_closed_form(x, y, weight, None)
    return loss, grad * scale


def onehot_bce_formula(x: Tensor, label: Tensor, score: Tensor, chan: Tensor, weight: Tensor, scale: Tensor) -> Tensor:
    """The same elementwise loss through PyTorch's BCE expression, differentiable by autograd
    (``scale`` scales the closed form's gradient only and is not part of the loss)."""
    return bce_with_logits_formula(x, torch.where(chan == label, score, 0.0), weight)


def onehot_bce_pass() -> LossPass:
    """The cached pass ``(x, label, score, chan, weight, scale) -> (summed loss, gradient)``."""
    return cached_pass("onehot_bce_with_logits", onehot_bce_closed_form, onehot_bce_formula, "sum", options=dense_pass_options)


def onehot_bce_into(out: Tensor, *args: Tensor) -> Tensor:
    """The summed loss (module docstring) of ``args = (x, label, score, chan, weight, scale)``, in
    the compute dtype of ``x`` and ``score``; the gradient is stored into ``out`` (shaped like
    ``x``). ``label`` and ``chan`` hold class indices (any dtype; exact below 2**24), ``scale`` is
    a 0-dim tensor."""
    return onehot_bce_pass()(*args, out=out)[0]


def fused_onehot_bce_with_logits(
    x: Tensor, label: Tensor, score: Tensor, chan: Tensor, weight: Tensor, *, compiled: bool = True
) -> Tensor:
    """The summed loss, differentiable in ``x`` (only the gradient is kept): the compiled pass, or
    with ``compiled=False`` the same closed form run eagerly (for inputs too small to be worth a
    compiled call; :func:`detloss.kernels.use_fused` decides)."""
    one = torch.ones((), dtype=weight.dtype, device=weight.device)
    return apply_pass(onehot_bce_pass(), compiled, x, label, score, chan, weight, one)
