"""detloss: object-detection losses for PyTorch, exact against their originals, fast and transparent.

Primitive losses live in :mod:`detloss.functional` (module twins in :mod:`detloss.nn`);
the complete detector losses are :class:`YOLOv3Loss`, :class:`YOLOv5Loss`, :class:`FCOSLoss`
and :class:`YOLOv8Loss`, each returning a :class:`LossOutput`; :class:`EndToEndLoss` combines the
one-to-many and one-to-one losses of an end-to-end head (YOLOv10, YOLO26).
"""
from __future__ import annotations

import importlib
from typing import Any

from .output import LossOutput

__version__ = "0.1.0"

_LAZY = {
    "YOLOv3Loss": "detloss.losses.yolov3",
    "YOLOv5Loss": "detloss.losses.yolov5",
    "FCOSLoss": "detloss.losses.fcos",
    "YOLOv8Loss": "detloss.losses.yolov8",
    "YOLOv8OBBLoss": "detloss.losses.obb",
    "YOLOv8PoseLoss": "detloss.losses.pose",
    "YOLO26PoseLoss": "detloss.losses.pose",
    "YOLOv8SegmentLoss": "detloss.losses.segment",
    "YOLO26SegmentLoss": "detloss.losses.segment",
    "TaskAlignedAssigner": "detloss.assign.tal",
    "EndToEndLoss": "detloss.losses.e2e",
    "HungarianMatcher": "detloss.assign.hungarian", "DETRLoss": "detloss.losses.detr", "RTDETRLoss": "detloss.losses.rtdetr", "DFINELoss": "detloss.losses.dfine", "DEIMLoss": "detloss.losses.dfine",  # noqa: E501
    "RetinaNetLoss": "detloss.losses.retinanet",
    "SSDLoss": "detloss.losses.ssd",
}

__all__ = ["LossOutput", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    # Detector losses are imported on first use so that `import detloss` stays light.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'detloss' has no attribute {name!r}")
