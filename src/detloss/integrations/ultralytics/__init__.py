"""Drop-in replacements for ultralytics 8.4's training criteria, computed by detloss.

Each criterion is built from an ultralytics task model and called as ultralytics calls its own::

    crit = DetectionLoss(model)          # like model.init_criterion(): E2ELoss form for YOLO26 / v10 heads
    loss, items = crit(preds, batch)     # loss vector (gains applied, x batch size), items dict
    crit.update()                        # after every epoch: the end-to-end schedule

``preds`` is the head's training output (a dict, or the ``(inference, dict)`` tuple of eval mode),
``batch`` the dataloader's dict. The criteria read only what ultralytics' read (see
:mod:`._model`); nothing here imports ultralytics.

To train with them: ``use_detloss(YOLO("yolo26n.yaml")).train(...)`` (see :mod:`._swap`).

Names: :class:`DetectionLoss` (``v8DetectionLoss``, or ``E2ELoss(v8DetectionLoss)`` for heads with
a one-to-one branch), :class:`E2EDetectLoss` (the legacy YOLOv10 criterion); the model-reading
helpers (:func:`read_model`, :class:`ModelInfo`, :func:`hyp`, :func:`training_outputs`,
:func:`branch_outputs`, :func:`batch_rows`, :func:`levels_of`, :class:`UltralyticsCriterion`) for
building the other tasks' criteria; :func:`criterion_for`, :func:`use_detloss`,
:func:`install_criterion`, :func:`register_criterion`.
"""
from ._model import (
    FORMS,
    ModelInfo,
    UltralyticsCriterion,
    batch_rows,
    batch_tensor,
    branch_outputs,
    head_class_names,
    hyp,
    levels_of,
    read_model,
    training_outputs,
)
from ._swap import CRITERIA, criterion_for, install_criterion, register_criterion, use_detloss
from .detect import DetectionLoss, E2EDetectLoss
from .obb import OBBLoss
from .pose import PoseLoss
from .segment import SegmentationLoss

__all__ = [
    "DetectionLoss",
    "E2EDetectLoss",
    "OBBLoss",
    "PoseLoss",
    "SegmentationLoss",
    "FORMS",
    "ModelInfo",
    "UltralyticsCriterion",
    "batch_rows",
    "batch_tensor",
    "branch_outputs",
    "head_class_names",
    "hyp",
    "levels_of",
    "read_model",
    "training_outputs",
    "CRITERIA",
    "criterion_for",
    "install_criterion",
    "register_criterion",
    "use_detloss",
]
