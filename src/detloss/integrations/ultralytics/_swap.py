"""Making an ultralytics training run use detloss's criterion.

``use_detloss(YOLO("yolo26n.yaml"))`` adds one callback to the model; when ``train()`` starts
(``on_train_start``: after the trainer has built the model, set ``model.args`` and, on resume,
restored the end-to-end schedule) it replaces ``model.criterion`` with :func:`criterion_for`'s
choice for the task model, taking over the schedule state of a criterion the trainer already
built. ultralytics' ``model.loss`` then calls it on every batch and the trainer calls its
``update()`` after every epoch, as with its own criterion. Validation losses (computed on the EMA
copy of the model) keep ultralytics' criterion, which gives the same values.

Multi-GPU (DDP) runs start fresh processes from the trainer's arguments, without the model's
callbacks; there, set the criterion in a trainer subclass of your own module, e.g. by overriding
``get_model`` to return a model whose ``init_criterion`` returns ``criterion_for(self)``.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Type, TypeVar

from ._model import UltralyticsCriterion

__all__ = ["CRITERIA", "register_criterion", "criterion_for", "install_criterion", "use_detloss"]

#: Task model class name (as in ``type(model).__mro__``) -> drop-in criterion class.
CRITERIA: Dict[str, Type[UltralyticsCriterion]] = {}

C = TypeVar("C", bound=Type[UltralyticsCriterion])


def register_criterion(model_class_name: str) -> Callable[[C], C]:
    """Class decorator: the criterion :func:`criterion_for` picks for models whose class (or a base)
    is named ``model_class_name`` (``"DetectionModel"``, ``"OBBModel"``, ...)."""

    def deco(cls: C) -> C:
        CRITERIA[model_class_name] = cls
        return cls

    return deco


def criterion_for(model: Any) -> UltralyticsCriterion:
    """The detloss criterion for an ultralytics task model, as its ``init_criterion`` would pick
    ultralytics' own.

    The task is the class in ``type(model).__mro__`` that defines ``init_criterion`` or ``loss``
    itself (a PoseModel's, not its DetectionModel base's; RTDETR, World and YOLOE models define
    their own and have no detloss criterion); for stand-ins whose classes define neither, the most
    derived class named in :data:`CRITERIA`. The criterion then chooses its end-to-end form from
    the head."""
    owner = next((c for c in type(model).__mro__ if "init_criterion" in vars(c) or "loss" in vars(c)), None)
    if owner is None:
        owner = next((c for c in type(model).__mro__ if c.__name__ in CRITERIA), None)
    if owner is None or owner.__name__ not in CRITERIA:
        task = type(model).__name__ if owner is None else owner.__name__
        raise TypeError(f"model: expected an ultralytics task model with a detloss criterion ({', '.join(sorted(CRITERIA))}), got {task}")
    return CRITERIA[owner.__name__](model)


def _unwrap(model: Any) -> Any:
    """The model inside torch.compile (``_orig_mod``) and DataParallel/DDP (``module``) wrappers."""
    while True:
        for name in ("_orig_mod", "module"):
            inner = getattr(model, name, None)
            if inner is not None:
                model = inner
                break
        else:
            return model


def install_criterion(trainer: Any) -> None:
    """The callback: give ``trainer.model`` detloss's criterion (keeping a built one's schedule)."""
    model = _unwrap(trainer.model)
    crit = criterion_for(model)
    old = getattr(model, "criterion", None)
    if old is not None:
        crit.load_schedule(old)
    model.criterion = crit


def use_detloss(yolo: Any) -> Any:
    """Make ``yolo.train(...)`` (an ultralytics ``YOLO`` object) use detloss's criterion; returns ``yolo``."""
    yolo.add_callback("on_train_start", install_criterion)
    return yolo
