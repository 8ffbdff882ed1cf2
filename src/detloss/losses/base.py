"""The skeleton every detector loss follows: :class:`DetectionLoss`.

A detector loss reads top to bottom, one named step each::

    inputs     = self.check(*args, **kwargs)          # validate, upcast, gather what the loss needs
    prepared   = self.prepare(inputs)                 # training-time decoding (predicted boxes, grids)
    assignment = self.assignment(inputs, prepared)    # an Assignment (detloss.assign.base)
    prepared   = self.gather(inputs, prepared, assignment)          # positives' predictions, normalizers
    raw        = self.compute_terms(inputs, prepared, assignment)   # {term: unweighted tensor}
    output     = self.output(inputs, prepared, assignment, raw)     # gains, total, stats -> LossOutput

``compute_terms`` calls one method per term, named in the class's :attr:`term_methods` table
(DETR's ``loss_map`` idea), so a term is found by its name; ``self.gains`` holds the weight of
each term in one dict. A loss whose terms are coupled (YOLOv5's per-level objectness with its
autobalance) overrides ``compute_terms`` instead and says why.

``gather`` adds to what ``prepare`` decoded what the terms share once the assignment is known
(the positives' predictions, the normalizers, the one cross-rank reduction); it is the only
step that may issue a collective, and :meth:`assign` does not run it.

Every loss also has

- :meth:`assign` with ``forward``'s arguments: the :class:`~detloss.assign.base.Assignment`
  it would use, for pictures and tests;
- :meth:`decode` turning raw head outputs into :class:`Decoded` boxes (xyxy pixels) and class
  scores in 0..1, the detector's inference decoding: the demo, the ``assign`` pictures and the
  evaluation use it instead of copies of their own.

Hooks that let the tools (the demo, the ``assign`` pictures) drive any registered loss without
a table of their own: :meth:`prior_outputs` (an untrained head's outputs for one image size),
:meth:`prediction_levels` (where each prediction lies), :meth:`call_kwargs` and
:meth:`targets_from_rows` (how YOLO rows and an image size reach ``forward``),
:attr:`image_size_argument` (the constructor's image-size argument, if it has one) and
:meth:`assignment_notes` (a word on each positive).

Stats: the keys of :data:`STAT_KEYS` mean the same in every loss and have the same Python type;
:meth:`finalize_stats` turns the 0-dim tensors a loss computes into Python numbers with one
device synchronization.

Precision: ``check`` picks the compute dtype (float32 for half-precision inputs) and the steps run
with ``torch.autocast`` turned off (:func:`detloss._checks.autocast_off`), so a loss called inside
an autocast region computes in that dtype throughout instead of in bfloat16 / float16 matmuls.

Cross-rank normalization: one option, ``reduce_across_ranks`` (default False: no collective is
ever issued unless asked for, so a loss computed on one rank only, e.g. validation on rank 0,
cannot deadlock). When True and ``torch.distributed`` is initialized, batch-wide normalizers go
through :meth:`global_mean` so that DistributedDataParallel's averaged gradient equals the
gradient of the whole global batch; each loss's docstring says which normalizers that is.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import distributed
from .._checks import autocast_off
from ..anchors import GridLevel
from ..assign.base import Assignment
from ..output import LossOutput

__all__ = ["DetectionLoss", "Decoded", "STAT_KEYS"]

#: Stats every detector loss reports, with their Python types.
STAT_KEYS: Dict[str, type] = {"num_pos": int, "num_targets": int, "iou_mean": float, "normalizer": float}


class Decoded(NamedTuple):
    """Inference decoding of a head: ``boxes [B, A, 4]`` xyxy pixels, ``scores [B, A, C]`` in 0..1."""

    boxes: Tensor
    scores: Tensor


def check_gains(gains: Mapping[str, float], names: Tuple[str, ...]) -> Dict[str, float]:
    """Gains as a dict of finite non-negative floats, one per term name, nothing else."""
    if set(gains) != set(names):
        raise ValueError(f"gains: expected one gain per term {list(names)}, got {sorted(gains)}")
    out = {}
    for k in names:
        v = gains[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{k}: expected a finite non-negative gain, got {v!r}")
        out[k] = float(v)
    return out


class DetectionLoss(torch.nn.Module):
    """Base of the detector losses (see the module docstring for the steps).

    Subclasses set :attr:`name` (the registry key) and :attr:`term_methods`, call
    ``super().__init__(gains, reduce_across_ranks=...)`` and implement :meth:`check`,
    :meth:`assignment`, the term methods, :meth:`stats` and :meth:`decode`; :meth:`prepare`,
    :meth:`gather`, :meth:`compute_terms` and :meth:`combine` have defaults.
    """

    #: The loss's key in :data:`detloss.losses.registry.LOSSES` (and the CLI's ``--loss``).
    name: ClassVar[str] = ""
    #: Term name -> name of the method computing it, in the order of ``components``.
    term_methods: ClassVar[Dict[str, str]] = {}

    #: The constructor's argument that takes the network input size ``(h, w)``, if it needs one.
    image_size_argument: ClassVar[Optional[str]] = None
    #: Class columns of the class scores that are no object class (SSD's background column 0):
    #: for ``K`` object classes the loss is built with ``num_classes = K + background_classes``.
    background_classes: ClassVar[int] = 0

    def __init__(self, gains: Mapping[str, float], *, reduce_across_ranks: bool = False) -> None:
        super().__init__()
        self.gains: Dict[str, float] = check_gains(gains, tuple(self.term_methods))
        self.reduce_across_ranks = bool(reduce_across_ranks)

    def add_term(self, name: str, method: str, gain: float, *, after: Optional[str] = None) -> None:
        """Add a term to this instance (a variant's extra term: the angle of rotated boxes, the
        keypoints of a pose head): ``method`` computes it, ``gain`` weights it, and it comes right
        after the term ``after`` (default: last) in ``components`` and ``terms``. Call it in
        ``__init__`` after the parent's; the class's :attr:`term_methods` is left as it is."""
        if name in self.term_methods:
            raise ValueError(f"name: expected a new term, {name!r} is already one of {list(self.term_methods)}")
        if not callable(getattr(self, method, None)):
            raise ValueError(f"method: expected the name of a method of {type(self).__name__}, got {method!r}")
        if after is not None and after not in self.term_methods:
            raise ValueError(f"after: expected one of {list(self.term_methods)}, got {after!r}")
        gain = check_gains({name: gain}, (name,))[name]
        items = list(self.term_methods.items())
        at = len(items) if after is None else [k for k, _ in items].index(after) + 1
        items.insert(at, (name, method))
        self.term_methods = dict(items)
        self.gains = {k: (gain if k == name else self.gains[k]) for k in self.term_methods}

    # ------------------------------------------------------------------ the pipeline
    def forward(self, *args: Any, **kwargs: Any) -> LossOutput:
        with autocast_off():  # the steps compute in the dtype check() chose, matmuls included
            inputs = self.check(*args, **kwargs)
            prepared = self.prepare(inputs)
            assignment = self.assignment(inputs, prepared)
            prepared = self.gather(inputs, prepared, assignment)
            raw = self.compute_terms(inputs, prepared, assignment)
            return self.output(inputs, prepared, assignment, raw)

    def assign(self, *args: Any, **kwargs: Any) -> Assignment:
        """The :class:`~detloss.assign.base.Assignment` this loss uses for ``forward``'s arguments."""
        with autocast_off():
            inputs = self.check(*args, **kwargs)
            with torch.no_grad():
                return self.assignment(inputs, self.prepare(inputs))

    # ------------------------------------------------------------------ steps to implement
    def check(self, *args: Any, **kwargs: Any) -> Any:
        """Validate ``forward``'s arguments; return what the other steps read (any object)."""
        raise NotImplementedError

    def prepare(self, inputs: Any) -> Any:
        """Training-time decoding the assignment and the terms share (default: nothing)."""
        return None

    def assignment(self, inputs: Any, prepared: Any) -> Assignment:
        """Target assignment on checked inputs; no gradient flows through it."""
        raise NotImplementedError

    def gather(self, inputs: Any, prepared: Any, assignment: Assignment) -> Any:
        """What the terms share once the assignment is known, returned as the new ``prepared``
        (default: ``prepared`` unchanged). Runs in ``forward`` only, with gradients."""
        return prepared

    def compute_terms(self, inputs: Any, prepared: Any, assignment: Assignment) -> Dict[str, Tensor]:
        """Unweighted terms, one per entry of :attr:`term_methods`."""
        return {name: getattr(self, method)(inputs, prepared, assignment) for name, method in self.term_methods.items()}

    def stats(self, inputs: Any, prepared: Any, assignment: Assignment, raw: Dict[str, Tensor]) -> Dict[str, Any]:
        """The loss's stats (at least :data:`STAT_KEYS`); 0-dim tensors become Python numbers."""
        raise NotImplementedError

    def decode(self, *head_outputs: Any, **kwargs: Any) -> Decoded:
        """Raw head outputs (``forward``'s arguments before the targets; ``kwargs``: those of
        :meth:`call_kwargs`) -> :class:`Decoded` (inference decoding of the detector)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ hooks for the tools
    def prior_outputs(self, image_size: Tuple[int, int], batch_size: int = 1) -> Tuple[Any, ...]:
        """``forward``'s arguments before the targets, as an untrained head gives them for
        ``batch_size`` images of ``image_size`` (h, w) pixels: all logits 0, float64."""
        raise NotImplementedError

    def prediction_levels(self, *head_outputs: Any, **kwargs: Any) -> List[GridLevel]:
        """Where the predictions of ``head_outputs`` (``forward``'s arguments before the targets;
        ``kwargs``: :meth:`call_kwargs`) lie, level by level, in the order of ``pred_index``."""
        raise NotImplementedError

    def call_kwargs(self, image_size: Tuple[int, int]) -> Dict[str, Any]:
        """Keyword arguments ``forward`` (and :meth:`assign`) takes for images of ``image_size``
        beyond the head outputs and targets (default: none)."""
        return {}

    def targets_from_rows(self, rows: Tensor, batch_size: int, image_size: Tuple[int, int]) -> Any:
        """YOLO rows ``[N, 6]`` (image, class, cx, cy, w, h; normalized) as ``forward`` takes its
        targets (default: the rows themselves)."""
        return rows

    def assignment_notes(self, assignment: Assignment) -> List[str]:
        """One short note per positive of ``assignment`` saying why it is one (default: none)."""
        return [""] * assignment.num_pos

    # ------------------------------------------------------------------ shared machinery
    def batch_factor(self, inputs: Any, prepared: Any) -> Union[int, Tensor]:
        """What ``total`` and ``terms`` are multiplied by (default 1; the YOLO losses' batch size,
        the global one with ``reduce_across_ranks``)."""
        return 1

    def combine(self, weighted: Dict[str, Tensor], inputs: Any, prepared: Any) -> Tuple[Tensor, Dict[str, Tensor]]:
        """``total`` and the graph-connected ``terms`` (summing to ``total``) from the weighted
        terms: ``total`` = their sum times :meth:`batch_factor`, each term times it."""
        factor = self.batch_factor(inputs, prepared)
        total = torch.stack(list(weighted.values())).sum() if weighted else torch.zeros(())
        if isinstance(factor, int) and factor == 1:
            return total, dict(weighted)
        return total * factor, {k: v * factor for k, v in weighted.items()}

    def output(self, inputs: Any, prepared: Any, assignment: Assignment, raw: Dict[str, Tensor]) -> LossOutput:
        weighted = {k: raw[k] * self.gains[k] for k in self.term_methods}
        total, terms = self.combine(weighted, inputs, prepared)
        with torch.no_grad():
            stats = self.finalize_stats(self.stats(inputs, prepared, assignment, raw))
        components = {k: v.detach() for k, v in weighted.items()}
        return LossOutput(total=total, components=components, stats=stats, terms=terms)

    def global_mean(self, value: Tensor) -> Tensor:
        """``value`` (detached) averaged over ranks when ``reduce_across_ranks`` is on and
        ``torch.distributed`` is initialized; ``value`` itself otherwise. Stack several
        normalizers into one tensor to reduce them with one collective."""
        if not self.reduce_across_ranks:
            return value
        return distributed.reduce_mean(value.detach())

    def world_size(self) -> int:
        """The number of ranks the normalizers are reduced over: ``torch.distributed``'s world
        size with ``reduce_across_ranks`` on, else 1 (asks no collective)."""
        return distributed.world_size() if self.reduce_across_ranks else 1

    @staticmethod
    def finalize_stats(stats: Dict[str, Any]) -> Dict[str, Any]:
        """0-dim tensors -> Python numbers (one ``tolist()``, so one synchronization); the keys of
        :data:`STAT_KEYS` get their declared type."""
        keys = [k for k, v in stats.items() if isinstance(v, Tensor) and v.ndim == 0]
        out = dict(stats)
        if keys:
            values = torch.stack([stats[k].detach().to(torch.float64) for k in keys]).tolist()
            for k, v in zip(keys, values):
                out[k] = int(round(v)) if not stats[k].is_floating_point() else v
        for k, typ in STAT_KEYS.items():
            if k in out and not isinstance(out[k], bool):
                out[k] = typ(out[k])
        return out
