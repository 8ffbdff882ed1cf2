"""torchvision's FCOS, RetinaNet and SSD models computing their training loss with detloss.

One call in a torchvision training script::

    model = torchvision.models.detection.retinanet_resnet50_fpn(...)
    detloss.integrations.torchvision.use_detloss(model)        # the one added line
    loss_dict = model(images, targets)                         # same keys as before
    sum(loss_dict.values()).backward()

:func:`use_detloss` replaces the model's ``compute_loss`` (an attribute of the instance; the
class is untouched) by one that calls :class:`detloss.FCOSLoss`, :class:`detloss.RetinaNetLoss`
or :class:`detloss.SSDLoss`, configured from the model itself (number of classes, matcher
thresholds, box coder weights, box loss type, centre-sampling radius, anchor sizes), and returns
torchvision's own loss dict, each value with its graph:

=========  ==================================================================
FCOS       ``classification``, ``bbox_regression``, ``bbox_ctrness``
RetinaNet  ``classification``, ``bbox_regression``
SSD        ``bbox_regression``, ``classification``
=========  ==================================================================

The values equal torchvision's (see the reference tests); what changes is the cost of the
matching (overlapping pairs only instead of boxes x anchors) and, for FCOS, the whole loss.
:func:`use_torchvision_loss` undoes it. This module imports no torchvision: it reads the model
it is given. Notes: torchvision's ``SSD.forward`` matches the default boxes before it calls
``compute_loss``; that matching still runs (the detloss loss matches again, the same way). For
FCOS the feature-map sizes and the padded batch size, which ``compute_loss`` does not receive,
are read by a forward pre-hook on the model's anchor generator.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["use_detloss", "use_torchvision_loss", "model_kind"]

_KINDS = ("FCOS", "RetinaNet", "SSD")


def model_kind(model: object) -> str:
    """``"FCOS"``, ``"RetinaNet"`` or ``"SSD"``: the torchvision detector class ``model`` is
    (read from the class names of its type, so subclasses count)."""
    names = [c.__name__ for c in type(model).__mro__]
    for kind in _KINDS:
        if kind in names:
            return kind
    raise TypeError(
        f"model: expected a torchvision FCOS, RetinaNet or SSD model (or a subclass), got {type(model).__name__}"
    )


def _attr(model: object, path: str) -> Any:
    obj = model
    for part in path.split("."):
        if not hasattr(obj, part):
            raise TypeError(f"model: expected torchvision's {path} on a {type(model).__name__}, it has none")
        obj = getattr(obj, part)
    return obj


class _FeatureSizes:
    """Forward pre-hook of an anchor generator: the last call's feature sizes and padded size."""

    def __init__(self) -> None:
        self.feature_sizes: Optional[List[Tuple[int, int]]] = None
        self.image_size: Optional[Tuple[int, int]] = None

    def __call__(self, module: torch.nn.Module, args: tuple) -> None:
        image_list, feature_maps = args[0], args[1]
        self.image_size = tuple(int(s) for s in image_list.tensors.shape[-2:])  # type: ignore[assignment]
        self.feature_sizes = [(int(f.shape[-2]), int(f.shape[-1])) for f in feature_maps]


class DetlossComputeLoss:
    """The ``compute_loss`` :func:`use_detloss` installs: calls ``loss`` with the model's head
    outputs and returns torchvision's loss dict (values with their graph)."""

    def __init__(self, kind: str, loss: torch.nn.Module, sizes: Optional[_FeatureSizes] = None) -> None:
        self.kind, self.loss, self.sizes = kind, loss, sizes
        self.hook: Any = None
        self.last_output: Any = None

    def __call__(self, targets, head_outputs: Dict[str, Tensor], anchors, *rest) -> Dict[str, Tensor]:
        if self.kind == "FCOS":
            if self.sizes is None or self.sizes.feature_sizes is None:
                raise RuntimeError("compute_loss: the anchor generator's sizes were not recorded (call the model)")
            out = self.loss(
                head_outputs["cls_logits"], head_outputs["bbox_regression"], head_outputs["bbox_ctrness"],
                self.sizes.feature_sizes, list(targets), image_size=self.sizes.image_size,
            )
            keys = {"classification": "cls", "bbox_regression": "box", "bbox_ctrness": "centerness"}
        else:
            out = self.loss(head_outputs["cls_logits"], head_outputs["bbox_regression"], list(anchors), list(targets))
            keys = (
                {"classification": "cls", "bbox_regression": "box"}
                if self.kind == "RetinaNet"
                else {"bbox_regression": "box", "classification": "cls"}
            )
        self.last_output = out
        return {theirs: out.terms[ours] for theirs, ours in keys.items()}


def _build_loss(model: torch.nn.Module, kind: str, options: Dict[str, Any]) -> torch.nn.Module:
    from .. import FCOSLoss, RetinaNetLoss, SSDLoss

    if kind == "RetinaNet":
        matcher = _attr(model, "proposal_matcher")
        coder = _attr(model, "head.regression_head.box_coder")
        args: Dict[str, Any] = dict(
            fg_iou_thresh=_attr(matcher, "high_threshold"),
            bg_iou_thresh=_attr(matcher, "low_threshold"),
            allow_low_quality_matches=_attr(matcher, "allow_low_quality_matches"),
            box_loss=_attr(model, "head.regression_head._loss_type"),
            bbox_reg_weights=tuple(coder.weights),
            bbox_xform_clip=coder.bbox_xform_clip,
        )
        args.update(options)
        return RetinaNetLoss(_attr(model, "head.classification_head.num_classes"), **args)
    if kind == "SSD":
        coder = _attr(model, "box_coder")
        args = dict(
            iou_thresh=_attr(model, "proposal_matcher.high_threshold"),
            neg_to_pos_ratio=_attr(model, "neg_to_pos_ratio"),
            bbox_reg_weights=tuple(coder.weights),
            bbox_xform_clip=coder.bbox_xform_clip,
        )
        args.update(options)
        return SSDLoss(_attr(model, "head.classification_head.num_columns"), **args)
    sizes = [float(s[0]) for s in _attr(model, "anchor_generator.sizes")]
    args = dict(
        # The spacing comes from the padded size (image_size // feature size, as torchvision's
        # anchor generator computes it); the strides only set the number of levels.
        strides=[8 * 2**i for i in range(len(sizes))],
        center_sampling_radius=_attr(model, "center_sampling_radius"),
        anchor_sizes=sizes,
    )
    args.update(options)
    return FCOSLoss(_attr(model, "head.classification_head.num_classes"), **args)


def use_detloss(model: torch.nn.Module, **loss_options: Any) -> torch.nn.Module:
    """Make a torchvision FCOS, RetinaNet or SSD ``model`` compute its training loss with detloss.

    ``loss_options`` go to the detloss loss's constructor, over the settings read from the model
    (e.g. ``gains={"cls": 1.0, "box": 2.0}``). Returns ``model`` (changed in place). Calling it
    again replaces the previous detloss loss.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model: expected a torchvision detection model (torch.nn.Module), got {type(model).__name__}")
    kind = model_kind(model)
    use_torchvision_loss(model)
    loss = _build_loss(model, kind, loss_options)
    sizes = _FeatureSizes() if kind == "FCOS" else None
    compute = DetlossComputeLoss(kind, loss, sizes)
    if sizes is not None:
        compute.hook = _attr(model, "anchor_generator").register_forward_pre_hook(sizes)
    model.__dict__["compute_loss"] = compute
    return model


def use_torchvision_loss(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`use_detloss`: the model's own ``compute_loss`` again. Returns ``model``."""
    current = model.__dict__.get("compute_loss")
    if isinstance(current, DetlossComputeLoss):
        del model.__dict__["compute_loss"]
        if current.hook is not None:
            current.hook.remove()
    return model
