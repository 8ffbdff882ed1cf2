"""Single-pass "loss and closed-form gradient" kernels behind the dense and box losses.

A detector's dense losses run over every anchor times every class (160,000 x 80 logits for a
batch of 8 at 640 px). Written as a chain of tensor ops, every op reads and writes the whole
tensor and autograd keeps several of them alive for backward. Here each loss is one elementwise
*closed form* that computes the loss and its gradient with respect to the logits (or the predicted
boxes) together, with the derivative in closed form; only the gradient is kept for backward,
which scales it by ``grad_output`` in place. Two ways run it:

* **compiled** (the fused path): ``torch.compile(dynamic=True)``; Inductor emits one C++/OpenMP loop
  on CPU and one Triton kernel on GPU from the same source, reused for every shape. Used when the
  input requires grad, has at least ``DETLOSS_FUSED_MIN_NUMEL`` elements (default 262144 = 2**18;
  below that a loss costs well under a millisecond and a first call would pay the compile time for
  nothing) and no other tensor requires grad, outside an enclosing ``torch.compile`` or
  ``torch.func`` transform (:func:`use_fused`).
* **plain** (everything else): the same closed form, eagerly, over chunks of the input small
  enough for the cache (on CPU). No compiler, no first-call cost; exact tiny gradients.

Gradients of targets or weights that require grad and second derivatives (``create_graph=True``)
come from autograd through each loss's *formula* (the loss written as its original writes it),
as does everything under ``vmap`` or an enclosing ``torch.compile``; ``torch.func.grad`` runs the
plain path (:class:`FusedLoss` has ``setup_context``).

Which losses: :func:`detloss.functional.bce_with_logits`, ``sigmoid_focal_loss``, ``bce_blur``,
``quality_focal_loss``, ``varifocal_loss`` (:mod:`detloss.kernels.dense`) and ``iou_loss`` for
giou/diou/ciou/iou in both conventions (:mod:`detloss.kernels.iou`, with the IoU formulas in
:mod:`detloss.kernels.iou_formula`); without a gradient, the box decoding of distribution heads
(:mod:`detloss.kernels.distributions`, what YOLOv8Loss's assigner reads). Results equal the formulas (the ground truth in the tests) to
rounding, gradients included. This package never imports :mod:`detloss.functional`.

Environment switches (read at every call):

* ``DETLOSS_FUSED=0``: never compile; every call runs the plain path.
* ``DETLOSS_COMPILE=0``: the same (for platforms without a C++ compiler or Triton); a pass that
  fails to compile also falls back to the plain path, with a warning.
* ``DETLOSS_FUSED_MIN_NUMEL=N``: the size threshold above.

Costs: the first compiled call of each configuration (loss, reduction, hyperparameters, dtypes)
compiles once, a few seconds on CPU; Inductor's on-disk cache makes later processes faster.
"""
from __future__ import annotations

from ._runtime import (
    DEFAULT_MIN_NUMEL,
    ENV_COMPILE,
    ENV_FUSED,
    ENV_MIN_NUMEL,
    FusedLoss,
    FusedLossForTransforms,
    LossPass,
    apply_pass,
    compile_enabled,
    fused_enabled,
    is_functorch_wrapped,
    min_numel,
    under_vmap,
    unwrap_functorch,
    use_fused,
)
from .dense import (
    BLUR_EPS,
    fused_bce_blur,
    fused_bce_with_logits,
    fused_quality_focal_loss,
    fused_sigmoid_focal_loss,
    fused_varifocal_loss,
)
from .distributions import decode_head_maps, use_compiled_decode
from .iou import FUSED_KINDS as FUSED_IOU_KINDS
from .iou import fused_iou_loss
from .onehot import fused_onehot_bce_with_logits

__all__ = [
    "DEFAULT_MIN_NUMEL",
    "ENV_COMPILE",
    "ENV_FUSED",
    "ENV_MIN_NUMEL",
    "BLUR_EPS",
    "FusedLoss",
    "FusedLossForTransforms",
    "LossPass",
    "apply_pass",
    "compile_enabled",
    "fused_enabled",
    "is_functorch_wrapped",
    "min_numel",
    "under_vmap",
    "unwrap_functorch",
    "use_fused",
    "fused_bce_with_logits",
    "fused_sigmoid_focal_loss",
    "fused_bce_blur",
    "fused_quality_focal_loss",
    "fused_varifocal_loss",
    "fused_iou_loss",
    "fused_onehot_bce_with_logits",
    "decode_head_maps",
    "use_compiled_decode",
    "FUSED_IOU_KINDS",
]
