"""The registry of detector losses: one plain dict from name to class.

The CLI's ``--loss`` / ``assign`` choices, the demo's heads and the evaluation read it; adding a
detector loss is one line here.
"""
from __future__ import annotations

from typing import Dict, Type

import torch

from .detr import DETRLoss
from .dfine import DEIMLoss, DFINELoss
from .fcos import FCOSLoss
from .rtdetr import RTDETRLoss
from .retinanet import RetinaNetLoss
from .ssd import SSDLoss
from .yolov3 import YOLOv3Loss
from .yolov5 import YOLOv5Loss
from .yolov8 import YOLOv8Loss

__all__ = ["LOSSES"]

LOSSES: Dict[str, Type[torch.nn.Module]] = {
    "yolov3": YOLOv3Loss,
    "yolov5": YOLOv5Loss,
    "fcos": FCOSLoss,
    "yolov8": YOLOv8Loss,
    "detr": DETRLoss, "rtdetr": RTDETRLoss, "dfine": DFINELoss, "deim": DEIMLoss,
    "retinanet": RetinaNetLoss,
    "ssd": SSDLoss,
}
