"""Fused single-pass "loss and closed-form gradient" kernels for the dense and box losses.

A detector's dense losses run over every anchor times every class (160,000 x 80 logits for a
batch of 8 at 640 px). Written as a chain of tensor ops, every op reads and writes the whole
tensor and autograd keeps several of them alive for backward. Here each loss is one elementwise
pass that reads the inputs once and writes the loss (or adds it up) and its gradient with respect
to the logits (or the predicted boxes) together, with the derivative in closed form; only the
gradient is kept for backward, which scales it by ``grad_output`` in place. The pass is compiled
with ``torch.compile(dynamic=True)``: Inductor emits one C++/OpenMP loop on CPU and one Triton
kernel on GPU from the same source, reused for every shape (no recompilation per batch size).

Which losses: :func:`detloss.functional.bce_with_logits`, ``sigmoid_focal_loss``, ``bce_blur``,
``quality_focal_loss``, ``varifocal_loss`` (:mod:`detloss.kernels.dense`) and ``iou_loss`` for
giou/diou/ciou in both conventions (:mod:`detloss.kernels.iou`). Those functions call
:func:`use_fused` after validating and dispatch here when it says so; results equal their plain
autograd formulas (the ground truth in the tests) to rounding, gradients included.

When the fused path is used (:func:`use_fused`): autograd needs the gradient of the input, no
other tensor needs one, and the input has at least ``DETLOSS_FUSED_MIN_NUMEL`` elements (default
262144 = 2**18; below that a loss costs well under a millisecond and a first call would pay the
compile time for nothing), outside an enclosing ``torch.compile`` or ``torch.func`` transform.

Environment switches (read at every call):

* ``DETLOSS_FUSED=0``: never fuse; every call runs the plain autograd formula.
* ``DETLOSS_COMPILE=0``: fuse, but run the eager closed-form pass instead of compiling it (for
  platforms without a C++ compiler or Triton; a failing compile also falls back, with a warning).
* ``DETLOSS_FUSED_MIN_NUMEL=N``: the size threshold above.

Costs: the first call of each configuration (loss, reduction, hyperparameters, dtypes) compiles
once, a few seconds on CPU; Inductor's on-disk cache makes later processes faster. Double
backward (``create_graph=True``) raises a RuntimeError: set ``DETLOSS_FUSED=0`` for it.
"""
from __future__ import annotations

from ._runtime import (
    DEFAULT_MIN_NUMEL,
    ENV_COMPILE,
    ENV_FUSED,
    ENV_MIN_NUMEL,
    compile_enabled,
    fused_enabled,
    min_numel,
    use_fused,
)
from .dense import (
    fused_bce_blur,
    fused_bce_with_logits,
    fused_quality_focal_loss,
    fused_sigmoid_focal_loss,
    fused_varifocal_loss,
)
from .iou import FUSED_KINDS as FUSED_IOU_KINDS
from .iou import fused_iou_loss
from .onehot import fused_onehot_bce_with_logits

__all__ = [
    "DEFAULT_MIN_NUMEL",
    "ENV_COMPILE",
    "ENV_FUSED",
    "ENV_MIN_NUMEL",
    "compile_enabled",
    "fused_enabled",
    "min_numel",
    "use_fused",
    "fused_bce_with_logits",
    "fused_sigmoid_focal_loss",
    "fused_bce_blur",
    "fused_quality_focal_loss",
    "fused_varifocal_loss",
    "fused_iou_loss",
    "fused_onehot_bce_with_logits",
    "FUSED_IOU_KINDS",
]
