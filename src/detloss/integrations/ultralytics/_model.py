"""Reading an ultralytics model the way its criteria do, parsing their call format, and the
end-to-end selection every drop-in criterion shares.

Everything here reads only what ultralytics 8.4.190's criteria read (``ultralytics/utils/loss.py``,
``nn/tasks.py`` ``init_criterion``), so a model object exposing nothing else works:

- ``next(model.parameters()).device``;
- ``model.args.<gain>`` for the gains the task uses (``hyp(model.args, "box")``), ``model.args.epochs`` only in
  ``update()`` of an end-to-end criterion;
- ``model.model[-1]`` (the head): ``stride``, ``nc``, ``reg_max``; ``getattr(head, "one2one_cv2",
  None)`` for the end-to-end decision; the class names of ``type(head).__mro__`` (YOLO26 variants);
  task modules read their own head fields (``kpt_shape``, ``flow_model``) from :attr:`ModelInfo.head`;
- ``getattr(model, "class_weights", None)``.

Building a drop-in criterion for a task (the pattern of ``detect.py``)::

    class TaskLoss(UltralyticsCriterion):
        def make_branch(self, model, info, tal_topk, tal_topk2):
            # a torch.nn.Module: forward(branch_preds: dict, batch: dict) -> detloss.LossOutput whose
            # ``terms`` are ultralytics' loss vector entries (gains applied, times the batch size)
            # and ``components`` its items (gains applied), named as the items without "_loss",
            # in ultralytics' order
            return MyTaskBranch(info, hyp(model.args, "box"), ..., tal_topk=tal_topk, tal_topk2=tal_topk2)

``UltralyticsCriterion.__init__`` reads the model (:func:`read_model`), picks the single or the
end-to-end form like ``init_criterion`` (:meth:`UltralyticsCriterion.form_for`), calls
``make_branch`` once or twice (top-k 10 / 7 then 1, or 10 / 1 for the legacy sum) and wraps two
branches in :class:`detloss.losses.e2e.EndToEndLoss`. ``crit(preds, batch)`` parses ``preds``
(:func:`training_outputs`, :func:`branch_outputs`) and returns ``(loss vector, items dict)``;
``crit.update()`` steps the schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ...assign.tal import Level
from ...losses.e2e import LEGACY_ONE2ONE_TOPK, ONE2MANY_TOPK, ONE2ONE_TOPK, EndToEndLoss
from ...output import LossOutput

__all__ = [
    "ModelInfo",
    "read_model",
    "hyp",
    "head_class_names",
    "training_outputs",
    "branch_outputs",
    "batch_tensor",
    "batch_rows",
    "levels_of",
    "UltralyticsCriterion",
    "FORMS",
]

#: How a criterion combines heads: ``"single"`` (one head, ``v8DetectionLoss`` and friends),
#: ``"e2e"`` (``E2ELoss``: scheduled weights, one-to-one items), ``"e2e_sum"`` (``E2EDetectLoss``).
FORMS = ("single", "e2e", "e2e_sum")


def head_class_names(head: Any) -> Tuple[str, ...]:
    """The class names of ``type(head).__mro__`` (``("Pose26", "Pose", "Detect", "Module", ...)``):
    how a library that does not import ultralytics tells the heads apart."""
    return tuple(c.__name__ for c in type(head).__mro__)


@dataclass(frozen=True)
class ModelInfo:
    """What every ultralytics criterion reads from the model, read once.

    Attributes:
        device: ``next(model.parameters()).device`` (where targets are moved).
        head: ``model.model[-1]``; task criteria read their own extra fields from it.
        head_classes: :func:`head_class_names` of the head.
        strides: ``head.stride`` as floats, one per level.
        num_classes: ``head.nc``.
        reg_max: ``head.reg_max`` (1: YOLO26's DFL-free boxes).
        class_weights: ``getattr(model, "class_weights", None)`` as a ``[nc]`` tensor, or None.
    """

    device: torch.device
    head: Any
    head_classes: Tuple[str, ...]
    strides: Tuple[float, ...]
    num_classes: int
    reg_max: int
    class_weights: Optional[Tensor]

    def head_is(self, class_name: str) -> bool:
        """True when the head's class or one of its bases is named ``class_name`` (e.g. "Pose26")."""
        return class_name in self.head_classes

    @property
    def end_to_end(self) -> bool:
        """``getattr(head, "one2one_cv2", None) is not None``: ultralytics' rule for ``E2ELoss``."""
        return getattr(self.head, "one2one_cv2", None) is not None


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not (isinstance(value, Tensor) and value.numel() == 1):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    return int(value)


def read_model(model: Any) -> ModelInfo:
    """Read device, head fields and class weights as ultralytics' criteria do (see the module
    docstring); the end-to-end decision (:attr:`ModelInfo.end_to_end`) reads ``one2one_cv2`` only
    when asked."""
    device = next(model.parameters()).device
    head = model.model[-1]
    strides = tuple(float(s) for s in torch.as_tensor(head.stride).flatten().tolist())
    nc = _int("model.model[-1].nc", head.nc)
    reg_max = _int("model.model[-1].reg_max", head.reg_max)
    cw = getattr(model, "class_weights", None)
    if cw is not None:
        cw = torch.as_tensor(cw)
        if cw.numel() != nc or not cw.is_floating_point():
            raise ValueError(f"model.class_weights: expected {nc} (nc) floating-point weights, got {cw.dtype} {tuple(cw.shape)}")
        cw = cw.to(device).reshape(nc)
    return ModelInfo(device, head, head_class_names(head), strides, nc, reg_max, cw)


def hyp(args: Any, name: str) -> float:
    """``args.<name>`` of a model's ``args`` namespace (``model.args``) as a float, e.g. the gain
    ``hyp(model.args, "box")``; an error naming the field when the namespace has none."""
    try:
        value = getattr(args, name)
    except AttributeError:
        raise ValueError(f"model.args.{name}: expected the hyperparameter (a number), the model's args have none") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"model.args.{name}: expected a number, got {type(value).__name__}")
    return float(value)


def training_outputs(preds: Any) -> Dict[str, Any]:
    """The head's training outputs dict: ``preds`` itself, or ``preds[1]`` of the ``(inference,
    dict)`` tuple heads return in eval mode (ultralytics ``parse_output``)."""
    out = preds[1] if isinstance(preds, tuple) else preds
    if not isinstance(out, Mapping):
        raise TypeError(
            f"preds: expected the head's outputs dict or an (inference, dict) tuple, got {type(out).__name__}"
        )
    return dict(out)


def branch_outputs(preds: Any, end_to_end: bool) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
    """``(one2many, one2one)`` dicts of an end-to-end head's outputs, or ``(outputs, None)``."""
    out = training_outputs(preds)
    is_e2e = "one2many" in out or "one2one" in out
    if end_to_end:
        if not ("one2many" in out and "one2one" in out):
            raise ValueError(
                f"preds: expected an end-to-end head's outputs with keys 'one2many' and 'one2one', got keys {sorted(out)}"
            )
        return training_outputs(out["one2many"]), training_outputs(out["one2one"])
    if is_e2e:
        raise ValueError(
            "preds: expected one head's outputs (boxes, scores, feats, ...), got an end-to-end head's "
            f"{sorted(out)}: the model's head has no one2one_cv2, build the criterion from the model that made them"
        )
    return out, None


def batch_tensor(batch: Mapping[str, Any], key: str) -> Tensor:
    """``batch[key]`` as a tensor, with an error naming the key when it is missing."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"batch: expected the dataloader's dict, got {type(batch).__name__}")
    if key not in batch:
        raise ValueError(f"batch: expected a {key!r} entry, got keys {sorted(batch)}")
    value = batch[key]
    if not isinstance(value, Tensor):
        raise TypeError(f"batch[{key!r}]: expected a tensor, got {type(value).__name__}")
    return value


def batch_rows(batch: Mapping[str, Any], device: torch.device, box_dim: int = 4) -> Tensor:
    """Target rows ``[N, 2 + box_dim]`` ``(image, class, *box)`` on ``device`` from ``batch_idx``
    ``(N,)``, ``cls`` ``(N, 1)`` and ``bboxes`` ``(N, box_dim)`` (normalized xywh [+ angle]), in the
    batch's floating dtype."""
    idx, cls, boxes = (batch_tensor(batch, k) for k in ("batch_idx", "cls", "bboxes"))
    n = idx.numel()
    if cls.numel() != n:
        raise ValueError(f"batch['cls']: expected {n} entries like batch['batch_idx'], got shape {tuple(cls.shape)}")
    if boxes.ndim != 2 or tuple(boxes.shape) != (n, box_dim):
        raise ValueError(f"batch['bboxes']: expected shape ({n}, {box_dim}), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"batch['bboxes']: expected a floating-point tensor, got {boxes.dtype}")
    dt = boxes.dtype
    return torch.cat((idx.reshape(-1, 1).to(dt), cls.reshape(-1, 1).to(dt), boxes), 1).to(device)


def levels_of(feats: Any, strides: Sequence[float], name: str = "preds['feats']") -> List[Level]:
    """``(h, w, stride)`` per level from the head's per-level feature maps (only their shapes are read)."""
    if isinstance(feats, Tensor) or not isinstance(feats, (list, tuple)):
        raise TypeError(f"{name}: expected a list of per-level feature maps, got {type(feats).__name__}")
    if len(feats) != len(strides):
        raise ValueError(f"{name}: expected {len(strides)} levels (one per head stride {tuple(strides)}), got {len(feats)}")
    out = []
    for i, (f, s) in enumerate(zip(feats, strides)):
        if not isinstance(f, Tensor) or f.ndim != 4:
            raise ValueError(f"{name}[{i}]: expected a [B, C, H, W] tensor, got {getattr(f, 'shape', type(f).__name__)}")
        out.append((int(f.shape[2]), int(f.shape[3]), float(s)))
    return out


class UltralyticsCriterion:
    """Base of the drop-in criteria: ``loss, items = crit(preds, batch)``, ``crit.update()``.

    Subclasses implement :meth:`make_branch` (see the module docstring). The form (:data:`FORMS`)
    is :meth:`form_for`'s choice, ultralytics' ``init_criterion`` rule: ``"e2e"`` when the head has
    a non-None ``one2one_cv2``, else ``"single"``; a subclass setting :attr:`fixed_form` (the
    legacy ``E2EDetectLoss``: ``"e2e_sum"``) always takes that form.

    ``crit(preds, batch)`` returns what ultralytics' criterion returns: the loss vector (one entry
    per item, gains applied, times the batch size, with its graph, in torch's default dtype as
    ultralytics allocates it) and the items dict ``{"box_loss": ..., ...}`` (detached 0-dim
    tensors, gains applied; end-to-end: the one-to-one branch's; legacy sum: both summed).

    Attributes: ``loss`` (the detloss module computing it: one branch or an
    :class:`~detloss.losses.e2e.EndToEndLoss`), ``form``, ``info`` (:class:`ModelInfo`),
    ``last_output`` (the :class:`~detloss.LossOutput` of the latest call, with the stats).
    """

    #: Set by a subclass that ignores the head and always takes one form.
    fixed_form: Optional[str] = None

    def __init__(self, model: Any) -> None:
        self.info = read_model(model)
        self.args = model.args  # read lazily: gains in make_branch, epochs only in update()
        self.form = self.form_for(self.info)
        if self.form == "single":
            self.loss: torch.nn.Module = self.make_branch(model, self.info, *ONE2MANY_TOPK)
        else:
            o2o = ONE2ONE_TOPK if self.form == "e2e" else LEGACY_ONE2ONE_TOPK
            self.loss = EndToEndLoss(
                self.make_branch(model, self.info, *ONE2MANY_TOPK),
                self.make_branch(model, self.info, *o2o),
                weighting="schedule" if self.form == "e2e" else "sum",
            )
        self.last_output: Optional[LossOutput] = None

    def form_for(self, info: ModelInfo) -> str:
        """The form ultralytics would train this head with (see the class docstring)."""
        if self.fixed_form is not None:
            return self.fixed_form
        return "e2e" if info.end_to_end else "single"

    def make_branch(self, model: Any, info: ModelInfo, tal_topk: int, tal_topk2: Optional[int]) -> torch.nn.Module:
        """One head's loss (see the module docstring for its call and output)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ the call
    def __call__(self, preds: Any, batch: Mapping[str, Any]) -> Tuple[Tensor, Dict[str, Tensor]]:
        one2many, one2one = branch_outputs(preds, self.form != "single")
        out = self.loss(one2many, batch) if one2one is None else self.loss(one2many, one2one, batch)
        self.last_output = out
        dt = torch.get_default_dtype()
        vector = torch.stack(list(out.terms.values())).to(dt)
        items = {f"{k}_loss": v.to(dt) for k, v in out.components.items()}
        return vector, items

    # ------------------------------------------------------------------ the schedule
    def update(self) -> None:
        """Step the end-to-end schedule (ultralytics' trainer calls it after every epoch); reads
        ``model.args.epochs``. Nothing to step in the single and legacy-sum forms."""
        if self.form == "e2e":
            self.loss.update(epochs=int(hyp(self.args, "epochs")))

    @property
    def updates(self) -> int:
        """Number of schedule steps so far (settable, as ultralytics' trainer sets it on resume)."""
        return self.loss.updates if isinstance(self.loss, EndToEndLoss) else 0

    @updates.setter
    def updates(self, value: int) -> None:
        if isinstance(self.loss, EndToEndLoss):
            self.loss.updates = int(value)

    @property
    def o2m(self) -> Optional[float]:
        """Weight of the one-to-many branch (None in the single form)."""
        return self.loss.o2m if isinstance(self.loss, EndToEndLoss) else None

    @property
    def o2o(self) -> Optional[float]:
        """Weight of the one-to-one branch (None in the single form)."""
        return self.loss.o2o if isinstance(self.loss, EndToEndLoss) else None

    def load_schedule(self, other: Any) -> None:
        """Take the schedule state (``updates``, ``o2m``, ``o2o``) of another criterion, e.g. the
        ``E2ELoss`` ultralytics' trainer built on resume."""
        if isinstance(self.loss, EndToEndLoss) and self.form == "e2e":
            for k in ("updates", "o2m", "o2o"):
                if not hasattr(other, k):
                    return
            self.loss.set_extra_state({"updates": other.updates, "o2m": other.o2m, "o2o": other.o2o})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(form={self.form!r}, loss={self.loss!r})"
