"""Adapters that make a framework's detection model train with a detloss loss.

Each adapter receives the framework's own objects (a model, its call format) and imports no
framework itself, so ``import detloss`` never imports torchvision or ultralytics:

- :mod:`detloss.integrations.torchvision`: ``use_detloss(model)`` for torchvision's FCOS,
  RetinaNet and SSD models.
- :mod:`detloss.integrations.ultralytics`: drop-ins for ultralytics' criteria (``DetectionLoss``,
  ``E2EDetectLoss``, ``OBBLoss``, ``PoseLoss``, ``SegmentationLoss``).
"""
