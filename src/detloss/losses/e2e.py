r"""End-to-end (NMS-free) training: a one-to-many and a one-to-one loss on two heads, combined.

YOLOv10 and YOLO26 heads carry two copies of their box and class branches. The *one-to-many*
copy is trained like YOLOv8 (each target teaches up to 10 anchors, task-aligned top-k 10); the
*one-to-one* copy, the one used at inference without NMS, learns from a single anchor per target
(top-k 7, then only each target's best-aligned positive: ``topk2 = 1``). Source: ultralytics 8.4
``ultralytics/utils/loss.py`` ``E2ELoss`` (and the legacy ``E2EDetectLoss``), ``nn/tasks.py``
``init_criterion``, ``engine/trainer.py`` (``criterion.update()`` at the end of every epoch).

With ``L_o2m``, ``L_o2o`` the two branches' losses (any detector loss of this package returning a
:class:`~detloss.LossOutput`, each normalized by its own assignment)::

    total       = w_o2m * L_o2m + w_o2o * L_o2o
    term[k]     = w_o2m * L_o2m.term[k] + w_o2o * L_o2o.term[k]       (graph-connected, sum = total)

``weighting="schedule"`` (``E2ELoss``, what ultralytics 8.4 trains YOLOv10 and YOLO26 with), ``u``
the number of :meth:`EndToEndLoss.update` calls so far (one per epoch), ``E`` the number of
epochs, ``w0 = 0.8``, ``w1 = 0.1``::

    w_o2m(0) = w0,                w_o2o(0) = 1 - w0               (= 0.19999999999999996 in float64)
    w_o2m(u) = max(1 - u / max(E - 1, 1), 0) * (w0 - w1) + w1,      w_o2o(u) = max(1 - w_o2m(u), 0)

so the weights move linearly from 0.8 / 0.2 to 0.1 / 0.9 at the last epoch and stay there. The
logged ``components`` are the *one-to-one* branch's (unweighted by ``w_o2o``), as ``E2ELoss``
returns them.

``weighting="sum"`` (``E2EDetectLoss``, the legacy YOLOv10 criterion: one-to-one top-k 1, no
``topk2``): ``w_o2m = w_o2o = 1`` always, components summed key by key; :meth:`update` changes
nothing.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .._checks import check_choice
from ..output import LossOutput

__all__ = [
    "EndToEndLoss",
    "EndToEndAssignment",
    "ONE2MANY_TOPK",
    "ONE2ONE_TOPK",
    "LEGACY_ONE2ONE_TOPK",
    "WEIGHTINGS",
]

#: ``(tal_topk, tal_topk2)`` of the one-to-many branch (ultralytics ``E2ELoss``, ``E2EDetectLoss``).
ONE2MANY_TOPK: Tuple[int, Optional[int]] = (10, None)
#: ``(tal_topk, tal_topk2)`` of the one-to-one branch of ``E2ELoss``.
ONE2ONE_TOPK: Tuple[int, Optional[int]] = (7, 1)
#: ``(tal_topk, tal_topk2)`` of the one-to-one branch of the legacy ``E2EDetectLoss``.
LEGACY_ONE2ONE_TOPK: Tuple[int, Optional[int]] = (1, None)
#: The two ways of combining the branches (see the module docstring).
WEIGHTINGS = ("schedule", "sum")


class EndToEndAssignment(NamedTuple):
    """The assignments of the two branches (what each base loss's ``assign`` returns)."""

    one2many: Any
    one2one: Any


def _check_weight(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name}: expected a number in [0, 1], got {value!r}")
    return float(value)


def _check_epochs(value: object, name: str = "epochs") -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}: expected None or an int >= 1, got {value!r}")
    return value


class EndToEndLoss(torch.nn.Module):
    r"""A one-to-many and a one-to-one detector loss on the two heads of an end-to-end detector.

    .. math::
        L = w_{o2m} L_{o2m} + w_{o2o} L_{o2o}, \qquad
        w_{o2m}(u) = \max\!\left(1 - \tfrac{u}{\max(E - 1, 1)}, 0\right)(w_0 - w_1) + w_1, \quad
        w_{o2o} = \max(1 - w_{o2m}, 0)

    (ultralytics 8.4 ``E2ELoss``; formula, schedule and the legacy ``"sum"`` form in the module
    docstring.)

    Args:
        one2many: the loss of the one-to-many head, a module returning a
            :class:`~detloss.LossOutput` (e.g. ``YOLOv8Loss(nc, tal_topk=10)``).
        one2one: the loss of the one-to-one head, with the same component names (e.g.
            ``YOLOv8Loss(nc, tal_topk=7, tal_topk2=1)``). :meth:`from_loss` builds both with
            ultralytics' top-k settings.
        epochs: number of training epochs ``E`` of the schedule; may instead be given to each
            :meth:`update` call (None: required there).
        weighting: ``"schedule"`` (default, ``E2ELoss``) or ``"sum"`` (``E2EDetectLoss``).
        o2m_start, o2m_final: ``w0`` and ``w1`` of the schedule (0.8, 0.1).

    Call ``loss_fn(one2many_outputs, one2one_outputs, *args, **kwargs)``: each base loss is called
    as ``base(its_head_outputs, *args, **kwargs)``, i.e. with its own head outputs as its first
    argument and the same targets (and any other argument) as the other. A base loss whose head
    outputs span several arguments takes them through a small adapter module of its own.

    Returns a :class:`~detloss.LossOutput`: ``total`` and ``terms`` as in the module docstring;
    ``components`` = the one-to-one branch's (``"schedule"``) or both branches' summed
    (``"sum"``); ``stats`` = the one-to-one branch's stats, the one-to-many branch's under keys
    prefixed ``"one2many."``, and the weights used, ``"o2m_weight"``, ``"o2o_weight"``.

    State: ``updates`` (int, the number of :meth:`update` calls), ``o2m`` and ``o2o`` (the current
    weights, Python floats) change only in :meth:`update`; they are part of ``state_dict()`` (extra
    state), so a checkpoint resumes the schedule. Resuming the way ultralytics' trainer does it
    (``updates = start_epoch - 1``, then ``update()``) gives the same weights.
    """

    def __init__(
        self,
        one2many: torch.nn.Module,
        one2one: torch.nn.Module,
        *,
        epochs: Optional[int] = None,
        weighting: str = "schedule",
        o2m_start: float = 0.8,
        o2m_final: float = 0.1,
    ) -> None:
        super().__init__()
        for name, m in (("one2many", one2many), ("one2one", one2one)):
            if not isinstance(m, torch.nn.Module):
                raise TypeError(f"{name}: expected a detector loss (torch.nn.Module), got {type(m).__name__}")
        self.one2many = one2many
        self.one2one = one2one
        self.weighting = check_choice("weighting", weighting, WEIGHTINGS)
        self.epochs = _check_epochs(epochs)
        self.o2m_start = _check_weight("o2m_start", o2m_start)
        self.o2m_final = _check_weight("o2m_final", o2m_final)
        self.updates = 0
        if self.weighting == "sum":
            self.o2m, self.o2o = 1.0, 1.0
        else:
            self.o2m = self.o2m_start
            self.o2o = 1.0 - self.o2m

    @classmethod
    def from_loss(
        cls,
        base: Callable[..., torch.nn.Module],
        /,
        *args: Any,
        epochs: Optional[int] = None,
        weighting: str = "schedule",
        **kwargs: Any,
    ) -> "EndToEndLoss":
        """Both branches from one loss class: ``base(*args, tal_topk=..., tal_topk2=..., **kwargs)``
        with ultralytics' settings (:data:`ONE2MANY_TOPK`; :data:`ONE2ONE_TOPK` for
        ``"schedule"``, :data:`LEGACY_ONE2ONE_TOPK` for ``"sum"``)."""
        check_choice("weighting", weighting, WEIGHTINGS)
        o2o = ONE2ONE_TOPK if weighting == "schedule" else LEGACY_ONE2ONE_TOPK
        branches = [base(*args, tal_topk=k, tal_topk2=k2, **kwargs) for k, k2 in (ONE2MANY_TOPK, o2o)]
        return cls(*branches, epochs=epochs, weighting=weighting)

    def extra_repr(self) -> str:
        return f"weighting={self.weighting!r}, epochs={self.epochs}, updates={self.updates}, o2m={self.o2m}, o2o={self.o2o}"

    # ------------------------------------------------------------------ the schedule
    def decay(self, updates: int, epochs: int) -> float:
        """``w_o2m`` after ``updates`` calls of :meth:`update` in an ``epochs``-epoch run."""
        return max(1 - updates / max(epochs - 1, 1), 0) * (self.o2m_start - self.o2m_final) + self.o2m_final

    def update(self, epochs: Optional[int] = None) -> None:
        """Step the schedule once (call it at the end of every epoch, as ultralytics' trainer does).

        ``epochs``: the run's number of epochs, else the constructor's. With ``weighting="sum"``
        nothing changes (both weights stay 1)."""
        if self.weighting == "sum":
            return
        e = _check_epochs(epochs) if epochs is not None else self.epochs
        if e is None:
            raise ValueError("epochs: expected the number of training epochs (constructor or update()), got None")
        self.updates += 1
        self.o2m = self.decay(self.updates, e)
        self.o2o = max(1.0 - self.o2m, 0)

    def get_extra_state(self) -> Dict[str, Any]:
        return {"updates": self.updates, "o2m": self.o2m, "o2o": self.o2o}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.updates, self.o2m, self.o2o = int(state["updates"]), float(state["o2m"]), float(state["o2o"])

    # ------------------------------------------------------------------ the loss
    def forward(self, one2many: Any, one2one: Any, *args: Any, **kwargs: Any) -> LossOutput:
        out_m = self.one2many(one2many, *args, **kwargs)
        out_o = self.one2one(one2one, *args, **kwargs)
        return self.combine(out_m, out_o)

    def combine(self, out_m: LossOutput, out_o: LossOutput) -> LossOutput:
        """The combined output from the two branches' outputs (the formula of the module docstring)."""
        for name, out in (("one2many", out_m), ("one2one", out_o)):
            if not isinstance(out, LossOutput):
                raise TypeError(f"{name}: expected the base loss to return a LossOutput, got {type(out).__name__}")
        if list(out_m.components) != list(out_o.components) or list(out_m.terms) != list(out_o.terms):
            raise ValueError(
                f"one2one: expected the same components as one2many {list(out_m.components)}, got {list(out_o.components)}"
            )
        w_m, w_o = self.o2m, self.o2o
        total = out_m.total * w_m + out_o.total * w_o
        terms = {k: out_m.terms[k] * w_m + out_o.terms[k] * w_o for k in out_m.terms}
        if self.weighting == "sum":
            components = {k: out_m.components[k] + out_o.components[k] for k in out_m.components}
        else:
            components = dict(out_o.components)
        stats: Dict[str, Any] = dict(out_o.stats)
        stats.update({f"one2many.{k}": v for k, v in out_m.stats.items()})
        stats["o2m_weight"], stats["o2o_weight"] = float(w_m), float(w_o)
        return LossOutput(total=total, components=components, stats=stats, terms=terms)

    def assign(self, one2many: Any, one2one: Any, *args: Any, **kwargs: Any) -> EndToEndAssignment:
        """Both branches' assignments (each base loss's ``assign``)."""
        return EndToEndAssignment(
            self.one2many.assign(one2many, *args, **kwargs), self.one2one.assign(one2one, *args, **kwargs)
        )

    def decode(self, *head_outputs: Any, **kwargs: Any) -> Any:
        """Inference decoding: the one-to-one head's (the head an end-to-end detector predicts with)."""
        return self.one2one.decode(*head_outputs, **kwargs)
