"""What the anchor-based losses (RetinaNet, SSD) share: their call, its checks, the decoding."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import as_pair, check_floating, compute_dtype, upcast
from ..anchor_generators import AnchorGenerator, DefaultBoxGenerator, feature_sizes_for
from ..anchors import GridLevel
from ..assign.base import Assignment
from ..assign.iou_matcher import AnchorsLike, check_anchors
from ..box_coder import BoxCoder
from ..boxes import yolo_rows_to_targets
from ..functional.iou import _box_iou_formula


@dataclass
class AnchorHeadInputs:
    """Checked arguments of ``loss_fn(cls_logits, bbox_regression, anchors, targets)``.

    ``cls_logits`` ``[B, A, C]`` and ``bbox_regression`` ``[B, A, 4]`` in the compute dtype
    (float32 for half precision, gradients flow back to the caller's tensors); ``anchors``
    ``[G, A, 4]`` (G = 1: one set for every image) in the compute dtype; ``targets`` as given
    (the matcher validates them)."""

    cls_logits: Tensor
    bbox_regression: Tensor
    anchors: Tensor
    targets: Sequence[Dict[str, Tensor]]
    dtype: torch.dtype

    @property
    def batch_size(self) -> int:
        return self.cls_logits.shape[0]

    @property
    def num_anchors(self) -> int:
        return self.cls_logits.shape[1]

    def anchors_of(self, assignment: Assignment) -> Tensor:
        """``[P, 4]`` the anchor of each positive."""
        g = assignment.batch_index if self.anchors.shape[0] > 1 else torch.zeros_like(assignment.batch_index)
        return self.anchors.reshape(-1, 4).index_select(0, g * self.num_anchors + assignment.pred_index)

    def codes_of(self, assignment: Assignment) -> Tensor:
        """``[P, 4]`` the predicted codes of each positive (with their graph)."""
        return self.bbox_regression.reshape(-1, 4).index_select(0, assignment.flat_index)


def check_anchor_heads(
    num_classes: int, cls_logits: object, bbox_regression: object, anchors: AnchorsLike, targets: object
) -> AnchorHeadInputs:
    """Shapes, dtypes and devices of the head outputs and the anchors (targets: by the matcher)."""
    check_floating("cls_logits", cls_logits)
    check_floating("bbox_regression", bbox_regression)
    if cls_logits.ndim != 3 or cls_logits.shape[2] != num_classes:  # type: ignore[union-attr]
        raise ValueError(f"cls_logits: expected shape [B, A, {num_classes}], got {tuple(cls_logits.shape)}")  # type: ignore[union-attr]
    b, a = cls_logits.shape[:2]  # type: ignore[union-attr]
    if tuple(bbox_regression.shape) != (b, a, 4):  # type: ignore[union-attr]
        raise ValueError(f"bbox_regression: expected shape {(b, a, 4)} like cls_logits, got {tuple(bbox_regression.shape)}")  # type: ignore[union-attr]
    if bbox_regression.device != cls_logits.device:  # type: ignore[union-attr]
        raise ValueError(f"bbox_regression: expected device {cls_logits.device} like cls_logits, got {bbox_regression.device}")  # type: ignore[union-attr]
    if b == 0:
        raise ValueError("cls_logits: expected a batch of at least one image, got batch size 0")
    if not isinstance(targets, (list, tuple)):
        raise TypeError(f"targets: expected a list of {{'boxes', 'labels'}} dicts (one per image), got {type(targets).__name__}")
    if len(targets) != b:
        raise ValueError(f"targets: expected {b} entries (one per image, as cls_logits), got {len(targets)}")
    anchors_t = check_anchors(anchors, b, num_anchors=a)
    if anchors_t.device != cls_logits.device:  # type: ignore[union-attr]
        raise ValueError(f"anchors: expected device {cls_logits.device} like cls_logits, got {anchors_t.device}")  # type: ignore[union-attr]
    dtype = compute_dtype(cls_logits, bbox_regression)  # type: ignore[arg-type]
    return AnchorHeadInputs(
        upcast(cls_logits, dtype), upcast(bbox_regression, dtype), anchors_t.detach().to(dtype), targets, dtype  # type: ignore[arg-type]
    )


def decode_anchor_boxes(coder: BoxCoder, bbox_regression: Tensor, anchors: AnchorsLike) -> Tensor:
    """``[B, A, 4]`` xyxy pixel boxes of the codes ``bbox_regression`` on ``anchors``."""
    check_floating("bbox_regression", bbox_regression)
    if bbox_regression.ndim != 3 or bbox_regression.shape[2] != 4:
        raise ValueError(f"bbox_regression: expected shape [B, A, 4], got {tuple(bbox_regression.shape)}")
    b, a = bbox_regression.shape[:2]
    anchors_t = check_anchors(anchors, b, num_anchors=a)
    dtype = compute_dtype(bbox_regression)
    return coder.decode(upcast(bbox_regression, dtype), anchors_t.to(dtype))


def positive_stats(inputs: AnchorHeadInputs, assignment: Assignment, coder: BoxCoder) -> Dict[str, Any]:
    """The stats both losses report about their positives (0-dim tensors and lists)."""
    with torch.no_grad():
        num_pos = assignment.num_pos
        if num_pos:
            pred = coder.decode(inputs.codes_of(assignment).detach(), inputs.anchors_of(assignment))
            iou = _box_iou_formula(pred, assignment.boxes.to(pred.dtype)).clamp(0, 1).mean()
        else:
            iou = torch.zeros((), dtype=torch.float64)
        per_image: List[int] = torch.bincount(assignment.batch_index, minlength=inputs.batch_size).tolist()
        num_targets = sum(int(t["boxes"].reshape(-1, 4).shape[0]) for t in inputs.targets)
    return {
        "num_pos": num_pos,
        "num_targets": num_targets,
        "iou_mean": iou,
        "num_pos_per_image": per_image,
        "matched_idxs": assignment.matched_idxs(),
    }


Generator = Union[AnchorGenerator, DefaultBoxGenerator]


class AnchorLayout:
    """The anchor layout the tools' hooks of an anchor-based loss use (``prior_outputs``,
    ``prediction_levels``): a generator, the backbone's strides (feature sizes
    ``ceil(image / stride)``) and the input size. ``forward`` never reads it: it takes the
    anchors it is given."""

    def __init__(self, generator: Generator, strides: Sequence[float], image_size: Optional[Tuple[int, int]]) -> None:
        if not isinstance(generator, (AnchorGenerator, DefaultBoxGenerator)):
            raise TypeError(
                f"anchor_generator: expected a detloss AnchorGenerator or DefaultBoxGenerator, got {type(generator).__name__}"
            )
        self.generator = generator
        self.strides = tuple(float(s) for s in strides)
        levels = len(generator.num_anchors_per_location())
        if len(self.strides) != levels or min(self.strides, default=0) <= 0:
            raise ValueError(f"strides: expected {levels} positive strides (one per level of the generator), got {tuple(strides)}")
        self.image_size = None if image_size is None else as_pair("image_size", image_size)

    def size(self, image_size: Optional[Tuple[int, int]] = None) -> Tuple[int, int]:
        size = image_size if image_size is not None else self.image_size
        if size is None:
            raise ValueError("image_size: required (h, w) in pixels to lay the anchors out (pass it to the constructor)")
        return as_pair("image_size", size)

    def anchors(self, image_size: Tuple[int, int]) -> Tensor:
        size = self.size(image_size)
        return self.generator(feature_sizes_for(size, self.strides), size, dtype=torch.float64)

    def levels(self, num_anchors: int) -> List[GridLevel]:
        size = self.size()
        levels = self.generator.grid_levels(feature_sizes_for(size, self.strides), size, self.strides)
        if sum(lv.num_preds for lv in levels) != num_anchors:
            raise ValueError(
                f"anchors: expected {sum(lv.num_preds for lv in levels)} anchors for the layout of {size} "
                f"(strides {self.strides}), got {num_anchors}"
            )
        return levels


class AnchorHeadHooks:
    """The tools' hooks (:class:`~detloss.losses.base.DetectionLoss`) of RetinaNet and SSD."""

    image_size_argument = "image_size"
    #: Label of YOLO class 0 (SSD: 1, its class 0 is the background).
    first_label = 0
    num_classes: int
    layout: AnchorLayout

    def prior_outputs(self, image_size: Tuple[int, int], batch_size: int = 1) -> Tuple[Any, ...]:
        anchors = self.layout.anchors(image_size)
        a = anchors.shape[0]
        return (
            torch.zeros(batch_size, a, self.num_classes, dtype=torch.float64),
            torch.zeros(batch_size, a, 4, dtype=torch.float64),
            anchors,
        )

    def prediction_levels(self, cls_logits: Tensor, bbox_regression: Tensor, anchors: AnchorsLike) -> List[GridLevel]:
        """The anchors' grid per level, for the layout of the constructor's ``image_size``."""
        return self.layout.levels(cls_logits.shape[1])

    def targets_from_rows(self, rows: Tensor, batch_size: int, image_size: Tuple[int, int]) -> List[Dict[str, Tensor]]:
        """YOLO rows as per-image ``{"boxes": xyxy pixels, "labels"}`` (label = class + first_label)."""
        out = yolo_rows_to_targets(rows.detach(), batch_size, as_pair("image_size", image_size))
        for t in out:
            t["labels"] = t["labels"] + self.first_label
        return out
