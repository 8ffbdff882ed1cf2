r"""YOLOv3's loss, as darknet computes it and as PyTorch-YOLOv3 computes it.

``flavor="darknet"`` -- pjreddie/darknet ``src/yolo_layer.c`` ``forward_yolo_layer``. Darknet never
writes a loss: it fills ``l.delta``, the NEGATIVE gradient of the loss w.r.t. the layer's raw
input, in closed form (``delta = target - p`` for every logistic entry, ``p = sigmoid(raw)``).
The loss whose gradient that is, per layer (sums, no normalization):

.. math::

    L = \sum_{pos} s\,\bigl[\mathrm{BCE}(t_x, \hat x) + \mathrm{BCE}(t_y, \hat y)\bigr]
      + \sum_{pos} \tfrac{s}{2}\bigl[(t_w - \hat w)^2 + (t_h - \hat h)^2\bigr]
      + \sum_{pos} \mathrm{BCE}(t_o, 1) + \sum_{noobj} \mathrm{BCE}(t_o, 0)
      + \sum_{pos}\sum_c \mathrm{BCE}(t_c, y_c)

with ``BCE(t, y)`` binary cross-entropy on the logit ``t`` (:func:`detloss.functional.bce_with_logits`),
``s = 2 - w h`` of the truth (normalized, so small boxes weigh up to 2), the targets
``x^ = cx W - i`` (the offset in the cell), ``w^ = log(w img_w / anchor_w)``, and ``noobj`` the
predictions that are neither positive nor ignored (best IoU over the image's truths above
``ignore_thresh``). Its autograd gradient equals minus darknet's delta entry for entry
(components ``"xy"``, ``"wh"``, ``"obj"``, ``"noobj"``, ``"cls"``). Darknet's printed ``cost``
(``sum(delta^2)``) is NOT this loss: it is the squared norm of the gradient.

The assignment (:func:`detloss.assign.darknet.assign_darknet`): the best anchor over all anchors
by shape IoU, written only by the layer whose mask holds it; ``truth_thresh`` pulls a prediction
whose best IoU exceeds it toward that truth (never with the default 1.0); truths are written in
their order, so a later truth in the same cell and anchor overwrites the box target. Classes
follow ``delta_yolo_class``: the first write sets the whole one-hot vector; a later write in the
same cell and anchor only sets its own class to 1 (both classes become positive) -- unless the
class-0 delta is exactly 0 at that moment (``p_0`` saturated at its target), in which case the
whole vector is rewritten, as darknet's ``if (delta[index])`` test does.

``flavor="pytorch-yolov3"`` -- eriklindernoren/PyTorch-YOLOv3 (d1041e0, 2019) ``models.py
YOLOLayer.forward`` with ``utils/utils.py build_targets``, per layer (means over each mask):

.. math::

    L = \mathrm{MSE}(\sigma(t_x), \hat x) + \mathrm{MSE}(\sigma(t_y), \hat y)
      + \mathrm{MSE}(t_w, \hat w) + \mathrm{MSE}(t_h, \hat h)
      + \lambda_{obj}\,\mathrm{BCE}_{obj}(\sigma(t_o), 1) + \lambda_{noobj}\,\mathrm{BCE}_{noobj}(\sigma(t_o), 0)
      + \mathrm{BCE}_{obj}(\sigma(t_c), y_c)

(``BCE`` on probabilities, :func:`detloss.functional.binary_cross_entropy`; defaults
``obj_scale`` 1, ``noobj_scale`` 100, ``ignore_thresh`` 0.5), the best anchor among the layer's
own anchors by width-height IoU, and anchors of the truth's cell with wh-IoU above
``ignore_thresh`` left out of the no-object mean. A mean over an empty mask is 0 here (NaN in the
original). ``box_scale="2-wh"`` weights the four MSE terms by ``2 - w h`` of the truth before the
mean (the modification of the write-up that discusses this code); the default ``"none"`` is the
original. The layers' losses are summed, as PyTorch-YOLOv3's model does.

Which gradient do x and y get? The write-up asks why darknet's x, y delta
``s (t - sigmoid(t_x))`` lacks the sigmoid's derivative ``p (1 - p)`` that squared error on
``sigmoid(t_x)`` would bring. Answer: darknet's x, y term is not squared error; it is the
(weighted) binary cross-entropy of the logit against the soft target ``x^``, whose gradient is
exactly ``s (p - x^)`` -- no ``p (1 - p)`` factor, so it never vanishes when the sigmoid
saturates. PyTorch-YOLOv3's MSE on ``sigmoid(t_x)`` gives ``(2/n) (p - x^) p (1 - p)``, which
does vanish there. (The soft-target BCE is not zero at its optimum ``p = x^``: its value there is
the binary entropy of ``x^``; only its gradient is darknet's.) In the truth_thresh branch the
target ``x^`` may fall outside [0, 1] (the truth's centre is in another cell); the formula and its
gradient ``s (p - x^)`` stay as darknet has them.

``stats``: ``"layers"``, one dict per layer -- darknet: its printed figures ``avg_iou``, ``class``,
``obj``, ``no_obj``, ``recall50``, ``recall75``, ``count`` (``None`` where darknet prints nan);
PyTorch-YOLOv3: its ``metrics`` (``loss``, ``x``, ``y``, ``w``, ``h``, ``conf``, ``cls``,
``cls_acc``, ``recall50``, ``recall75``, ``precision``, ``conf_obj``, ``conf_noobj``,
``grid_size``) -- plus ``num_pos`` (cells with an object term), ``num_ignored`` (cells with no
objectness term at all), ``num_targets`` (target rows), ``iou_mean`` (darknet: the mean of its
per-truth IoUs, "Avg IOU" over all layers; PyTorch-YOLOv3: the IoU of the object cells' decoded
boxes with their truths; 0.0 without positives) and ``normalizer`` (darknet: 1.0, its terms are
sums; PyTorch-YOLOv3: the object cells its means divide by, summed over layers).

Distributed training: ``reduce_across_ranks=True`` makes DistributedDataParallel's averaged
gradient the whole global batch's. darknet's sums are then multiplied by the world size (DDP
divides by it); PyTorch-YOLOv3's means divide by the mean over ranks of each layer's object and
no-object counts (one all-reduce per call). The default issues no collective: each rank is a
batch of its own, as in the originals.

Inputs may be float16/bfloat16: the loss is computed in float32 (float64 inputs in float64);
the assignment decisions are always made in float32, as darknet makes them. Non-finite layer
inputs are a ValueError naming ``inputs[i]``; a batch of 0 images gives a zero loss (darknet's
figures None, as it would print nan).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import as_pair, check_choice, compute_dtype, upcast
from ..anchors import GridLevel, grid_points
from ..assign.base import PerLevelAssignment
from ..assign.darknet import (
    DarknetLayerAssignment,
    PyTorchYOLOv3LayerAssignment,
    assign_darknet,
    assign_pytorch_yolov3,
    check_yolo_layers,
    check_darknet_targets,
)
from ..boxes import cxcywh_to_xyxy
from ..functional import aligned_box_iou, bce_with_logits, binary_cross_entropy, mse_loss
from ._grid_cells import flat_cells, gather_cells
from .base import Decoded, DetectionLoss

__all__ = ["YOLOv3Loss", "YOLOV3_ANCHORS", "YOLOV3_MASKS", "FLAVORS", "BOX_SCALES"]

#: Raw width/height logits are clamped to this before ``exp`` in :meth:`YOLOv3Loss.decode` (e^10 anchors).
DECODE_MAX_LOG_SCALE = 10.0

#: yolov3.cfg's anchors (w, h) in pixels of a 416 x 416 input, and the mask of each layer.
YOLOV3_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
YOLOV3_MASKS = ((6, 7, 8), (3, 4, 5), (0, 1, 2))
FLAVORS = ("darknet", "pytorch-yolov3")
BOX_SCALES = ("2-wh", "none")
COMPONENTS = ("xy", "wh", "obj", "noobj", "cls")

_DEFAULTS = {  # per flavor: ignore_thresh, box_scale
    "darknet": (0.7, "2-wh"),  # yolov3.cfg
    "pytorch-yolov3": (0.5, "none"),  # YOLOLayer.__init__
}
_PV3_OBJ_SCALE = 1.0  # YOLOLayer.obj_scale
_PV3_NOOBJ_SCALE = 100.0  # YOLOLayer.noobj_scale
_PV3_EPS = 1e-16  # build_targets' log(gw / anchor + 1e-16) and the metrics' denominators


def _number(name: str, value: Any, low: float = 0.0) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number, got {type(value).__name__}") from None
    if not (math.isfinite(v) and v >= low):
        raise ValueError(f"{name}: expected a finite number >= {low}, got {value!r}")
    return v


def _mean_or_none(total: float, count: int) -> Optional[float]:
    return total / count if count else None


@dataclass
class YOLOv3Inputs:
    """Checked inputs of :class:`YOLOv3Loss`: the raw layer inputs, the target rows as given and
    on the inputs' device in the compute ``dtype``."""

    inputs: List[Tensor]
    targets: Tensor
    rows: Tensor
    dtype: torch.dtype


@dataclass
class LayerCells:
    """What a layer's loss reads from its input, with one gradient for all of it: the object
    cells (image, anchor, gy, gx and ``flat``, their flat index into the ``[B, A, H, W]`` cells,
    in cell order), every cell's objectness logit ``obj [B, A, H, W]`` and the object cells' box
    logits ``box [P, 4]`` and class logits ``cls [P, C]``."""

    image: Tensor
    anchor: Tensor
    gy: Tensor
    gx: Tensor
    flat: Tensor
    obj: Tensor
    box: Tensor
    cls: Tensor


@dataclass
class YOLOv3Layers:
    """What :meth:`YOLOv3Loss.gather` computes, per layer: its five parts (``xy`` ... ``cls``,
    unweighted), its printed figures, its object-term and ignored cell counts; and the
    normalizer, the IoU mean and the factor ``total`` is multiplied by."""

    parts: List[Dict[str, Tensor]] = field(default_factory=list)
    figures: List[Dict[str, Any]] = field(default_factory=list)
    num_pos: int = 0
    num_ignored: int = 0
    normalizer: Union[float, Tensor] = 1.0
    iou_mean: Union[float, Tensor] = 0.0
    batch_factor: Union[int, Tensor] = 1


class YOLOv3Loss(DetectionLoss):
    """YOLOv3's loss with darknet's exact semantics, or PyTorch-YOLOv3's (see the module docstring).

    Args:
        num_classes: number of classes ``C``.
        anchors: all anchors ``(w, h)`` in pixels of the network input (yolov3.cfg's ``anchors``).
        masks: ``masks[i]`` the anchor indices of layer ``i`` (yolov3.cfg's ``mask``).
        strides: ``strides[i]`` the stride of layer ``i``; its grid is ``img_size / stride``.
        img_size: the network input ``(h, w)`` in pixels (or one int for a square).
        ignore_thresh: darknet: best-IoU threshold above which a prediction has no no-object term
            (default 0.7); PyTorch-YOLOv3: wh-IoU threshold for the same (default 0.5).
        truth_thresh: darknet only: best IoU above which a prediction is pulled toward that truth
            (default 1.0, never).
        flavor: ``"darknet"`` or ``"pytorch-yolov3"``.
        box_scale: ``"2-wh"`` (weight box terms by ``2 - w h``) or ``"none"``; default
            ``"2-wh"`` for darknet, ``"none"`` for PyTorch-YOLOv3.
        obj_scale, noobj_scale: PyTorch-YOLOv3 only: weights of the object and no-object
            confidence terms (defaults 1 and 100; the loss's ``gains["obj"]``, ``["noobj"]``).
        reduce_across_ranks: see "Distributed training" in the module docstring (default False).

    Call: ``loss_fn(inputs, targets) -> LossOutput`` with ``inputs`` a list of raw layer inputs
    ``[B, len(masks[i]) * (5 + C), img_h / strides[i], img_w / strides[i]]`` (channel
    ``a * (5 + C) + e``: entry ``e`` = tx, ty, tw, th, objectness, classes of anchor slot ``a``) and
    ``targets`` ``[N, 6]`` rows ``(image_index, class, cx, cy, w, h)`` normalized to 0..1, in
    darknet's truth order per image. Stateless: no value is kept between calls. ``components``
    and ``terms`` (with their graph; they sum to ``total``) are ``"xy"``, ``"wh"``, ``"obj"``,
    ``"noobj"``, ``"cls"``, summed over the layers. :meth:`assign` gives the
    :class:`~detloss.assign.darknet.DarknetAssignment` (or ``PyTorchYOLOv3Assignment``);
    :meth:`decode` the inference boxes and scores.
    """

    name = "yolov3"
    #: Every term is :meth:`layer_sum` of its part: :meth:`gather` computes a layer's five parts in
    #: one pass (darknet's class targets follow the order of the layer's writes).
    term_methods = {c: "layer_sum" for c in COMPONENTS}
    image_size_argument = "img_size"

    def __init__(
        self,
        num_classes: int,
        anchors: Sequence[Sequence[float]] = YOLOV3_ANCHORS,
        masks: Sequence[Sequence[int]] = YOLOV3_MASKS,
        strides: Sequence[int] = (32, 16, 8),
        img_size: Any = (416, 416),
        ignore_thresh: Optional[float] = None,
        truth_thresh: float = 1.0,
        flavor: str = "darknet",
        box_scale: Optional[str] = None,
        obj_scale: Optional[float] = None,
        noobj_scale: Optional[float] = None,
        *,
        reduce_across_ranks: bool = False,
    ) -> None:
        gains = dict.fromkeys(COMPONENTS, 1.0)
        if flavor == "darknet" and (obj_scale is not None or noobj_scale is not None):
            raise ValueError("obj_scale, noobj_scale: only the 'pytorch-yolov3' flavor has them (darknet weighs 1)")
        if flavor != "darknet":
            gains["obj"] = _PV3_OBJ_SCALE if obj_scale is None else _number("obj_scale", obj_scale)
            gains["noobj"] = _PV3_NOOBJ_SCALE if noobj_scale is None else _number("noobj_scale", noobj_scale)
        super().__init__(gains, reduce_across_ranks=reduce_across_ranks)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive int, got {num_classes!r}")
        self.flavor = check_choice("flavor", flavor, FLAVORS)
        self.num_classes = num_classes
        try:
            self.anchors = tuple((float(w), float(h)) for w, h in anchors)
        except (TypeError, ValueError):
            raise ValueError(f"anchors: expected a sequence of (w, h) pairs, got {anchors!r}") from None
        if not self.anchors or not all(math.isfinite(v) and v > 0 for a in self.anchors for v in a):
            raise ValueError(f"anchors: expected positive finite (w, h) pairs, got {anchors!r}")
        try:
            self.masks = tuple(tuple(int(m) for m in mask) for mask in masks)
        except (TypeError, ValueError):
            raise ValueError(f"masks: expected a sequence of sequences of anchor indices, got {masks!r}") from None
        k = len(self.anchors)
        if not self.masks or any(not m or any(not 0 <= i < k for i in m) for m in self.masks):
            raise ValueError(f"masks: expected non-empty lists of anchor indices in [0, {k}), got {masks!r}")
        self.strides = tuple(int(s) for s in strides)
        if len(self.strides) != len(self.masks) or any(s < 1 for s in self.strides):
            raise ValueError(f"strides: expected {len(self.masks)} positive ints (one per mask), got {strides!r}")
        self.img_size = as_pair("img_size", img_size)
        if any(v < 1 or v % s for s in self.strides for v in self.img_size):
            raise ValueError(f"img_size: expected (h, w) multiples of every stride {self.strides}, got {img_size!r}")
        default_ignore, default_scale = _DEFAULTS[flavor]
        self.ignore_thresh = default_ignore if ignore_thresh is None else _number("ignore_thresh", ignore_thresh)
        self.truth_thresh = _number("truth_thresh", truth_thresh)
        self.box_scale = check_choice("box_scale", default_scale if box_scale is None else box_scale, BOX_SCALES)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, flavor={self.flavor!r}, img_size={self.img_size}, "
            f"ignore_thresh={self.ignore_thresh}, truth_thresh={self.truth_thresh}, box_scale={self.box_scale!r}, "
            f"gains={self.gains}, reduce_across_ranks={self.reduce_across_ranks}"
        )

    # ------------------------------------------------------------------------------------------

    def check(self, inputs: Sequence[Tensor], targets: Tensor) -> YOLOv3Inputs:
        check_yolo_layers(inputs, self.masks, self.num_classes, self.img_size, self.strides)
        targets = check_darknet_targets(targets, inputs[0].shape[0], self.num_classes)
        dtype = compute_dtype(*inputs)
        rows = targets.detach().to(device=inputs[0].device, dtype=dtype)
        return YOLOv3Inputs(list(inputs), targets, rows, dtype)

    def assignment(self, inputs: YOLOv3Inputs, prepared: None) -> PerLevelAssignment:
        """darknet's decisions (:func:`detloss.assign.darknet.assign_darknet`) or PyTorch-YOLOv3's
        ``build_targets`` (:func:`~detloss.assign.darknet.assign_pytorch_yolov3`)."""
        if self.flavor == "darknet":
            return assign_darknet(
                inputs.inputs, inputs.targets, self.anchors, self.masks, self.img_size, self.ignore_thresh, self.truth_thresh
            )
        return assign_pytorch_yolov3(inputs.inputs, inputs.targets, self.anchors, self.masks, self.img_size, self.ignore_thresh)

    def gather(self, inputs: YOLOv3Inputs, prepared: None, assignment: PerLevelAssignment) -> YOLOv3Layers:
        """Layer by layer: the positives' rows, their targets and the layer's five parts (a
        layer's class targets depend on the order of its writes, so the parts come together)."""
        out = YOLOv3Layers()
        xs = [upcast(x, inputs.dtype) for x in inputs.inputs]
        cells = self._read_cells(xs, assignment)
        if self.flavor == "darknet":
            for x, a, mask, c in zip(xs, assignment, self.masks, cells):
                self._add_layer(out, *self._darknet_layer(x, a, inputs.rows, mask, c))
            ious = torch.cat([a.iou for a in assignment])
            out.iou_mean = ious.double().mean() if ious.numel() else 0.0
            world = self.world_size()
            out.normalizer, out.batch_factor = 1.0 / world, world
            return out
        counts = [(float(a.obj_mask.sum()), float(a.noobj_mask.sum())) for a in assignment]
        divisors: List[Optional[Tuple[Tensor, Tensor]]] = [None] * len(counts)
        if self.reduce_across_ranks:
            mean = self.global_mean(torch.tensor(counts, dtype=inputs.dtype, device=inputs.rows.device))
            divisors = [tuple(torch.where(m > 0, m, 1.0).unbind(0)) for m in mean]  # type: ignore[misc]
            out.normalizer = mean[:, 0].sum()
        else:
            out.normalizer = float(sum(n for n, _ in counts))
        ious = []
        for x, a, mask, div, c in zip(xs, assignment, self.masks, divisors, cells):
            parts, figures, npos, nign, iou = self._pytorch_yolov3_layer(x, a, inputs.rows, mask, c, div)
            self._add_layer(out, parts, figures, npos, nign)
            ious.append(iou)
        if assignment.num_pos:
            out.iou_mean = torch.cat(ious).mean()
        return out

    def _read_cells(self, xs: Sequence[Tensor], assignment: PerLevelAssignment) -> List[LayerCells]:
        """Every layer's objectness logits and its object cells' rows (darknet: the positives;
        PyTorch-YOLOv3: ``obj_mask``), read at once with one gradient buffer per layer
        (:func:`~detloss.losses._grid_cells.gather_cells`)."""
        views, coords, flats = [], [], []
        for x, a, mask in zip(xs, assignment, self.masks):
            nb, _, h, w = x.shape
            views.append(x.reshape(nb, len(mask), 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2))
            cell_mask = a.positive if self.flavor == "darknet" else a.obj_mask
            coords.append(cell_mask.nonzero(as_tuple=True))  # cell order, as boolean indexing
            flats.append(flat_cells(views[-1].shape, *coords[-1]))
        objs, box, classes = gather_cells(views, flats)
        boxes = box.split([f.numel() for f in flats])
        return [LayerCells(*c, f, o, b, k) for c, f, o, b, k in zip(coords, flats, objs, boxes, classes)]

    @staticmethod
    def _add_layer(out: YOLOv3Layers, parts, figures, num_pos: int, num_ignored: int) -> None:
        out.parts.append(parts)
        out.figures.append(figures)
        out.num_pos += num_pos
        out.num_ignored += num_ignored

    def compute_terms(self, inputs: YOLOv3Inputs, layers: YOLOv3Layers, assignment: PerLevelAssignment) -> Dict[str, Tensor]:
        """Each part summed over the layers (:meth:`gather` computed them layer by layer)."""
        return {c: self.layer_sum(layers, c) for c in self.term_methods}

    @staticmethod
    def layer_sum(layers: YOLOv3Layers, name: str) -> Tensor:
        """Part ``name`` summed over the layers."""
        total = layers.parts[0][name]
        for parts in layers.parts[1:]:
            total = total + parts[name]
        return total

    def batch_factor(self, inputs: YOLOv3Inputs, layers: YOLOv3Layers) -> Union[int, Tensor]:
        return layers.batch_factor

    def stats(self, inputs: YOLOv3Inputs, layers: YOLOv3Layers, assignment: PerLevelAssignment, raw: Dict[str, Tensor]) -> Dict[str, Any]:
        return {
            "layers": layers.figures,
            "num_pos": layers.num_pos,
            "num_ignored": layers.num_ignored,
            "num_targets": int(inputs.targets.shape[0]),
            "iou_mean": layers.iou_mean,
            "normalizer": layers.normalizer,
        }

    def decode(self, inputs: Sequence[Tensor]) -> Decoded:
        """The detector's inference decoding of the raw layer inputs: per layer, anchor slot and
        cell ``xy = (sigmoid(t_xy) + cell) * stride``, ``wh = exp(t_wh) * anchor`` (pixels; the
        logits clamped at :data:`DECODE_MAX_LOG_SCALE`), boxes ``[B, A, 4]`` xyxy in the order of
        the layers' ``[anchor slot, H, W]`` cells; scores ``sigmoid(obj) * sigmoid(cls)``."""
        check_yolo_layers(inputs, self.masks, self.num_classes, self.img_size, self.strides)
        dtype = compute_dtype(*inputs)
        nc = self.num_classes
        boxes, scores = [], []
        for x, mask, stride in zip(inputs, self.masks, self.strides):
            b, _, h, w = x.shape
            p = upcast(x, dtype).view(b, len(mask), 5 + nc, h, w).permute(0, 1, 3, 4, 2)
            cell = grid_points([(h, w)], [(1.0, 1.0)], offset=0.0, dtype=dtype, device=x.device).view(1, 1, h, w, 2)
            anchors = torch.tensor([self.anchors[m] for m in mask], dtype=dtype, device=x.device).view(1, -1, 1, 1, 2)
            xy = (p[..., 0:2].sigmoid() + cell) * stride
            wh = p[..., 2:4].clamp(max=DECODE_MAX_LOG_SCALE).exp() * anchors
            boxes.append(cxcywh_to_xyxy(torch.cat((xy, wh), -1)).reshape(b, len(mask) * h * w, 4))
            scores.append((p[..., 5:].sigmoid() * p[..., 4:5].sigmoid()).reshape(b, len(mask) * h * w, nc))
        return Decoded(torch.cat(boxes, 1), torch.cat(scores, 1))

    # ------------------------------------------------------------------ hooks for the tools
    def prior_outputs(self, image_size: Tuple[int, int], batch_size: int = 1) -> Tuple[List[Tensor]]:
        """Zero logits for the network input ``img_size`` (``image_size`` must be it): every
        prediction is its anchor centred in its cell."""
        if tuple(image_size) != tuple(self.img_size):
            raise ValueError(f"image_size: expected the loss's img_size {self.img_size}, got {tuple(image_size)}")
        h, w = self.img_size
        return ([torch.zeros(batch_size, len(m) * (5 + self.num_classes), h // s, w // s, dtype=torch.float64)
                 for m, s in zip(self.masks, self.strides)],)

    def prediction_levels(self, inputs: Sequence[Tensor]) -> List[GridLevel]:
        """The layers' anchor slots (pixels) on their grids, drawn at the cell centres."""
        return [
            GridLevel(float(s), (int(x.shape[2]), int(x.shape[3])), (float(s), float(s)), anchors=[self.anchors[m] for m in mask])
            for x, mask, s in zip(inputs, self.masks, self.strides)
        ]

    def assignment_notes(self, assignment: PerLevelAssignment) -> List[str]:
        """darknet: the truth pass's best anchor of all (and an overwritten box target), or the
        truth_thresh branch's IoU; PyTorch-YOLOv3: the best of the layer's anchors."""
        if self.flavor != "darknet":
            return ["best of the layer's anchors"] * assignment.num_pos
        notes = []
        for a in assignment:
            written = {}
            for b, k, y, x, t, n in zip(*(v.tolist() for v in (a.image, a.anchor, a.gy, a.gx, a.truth, a.anchor_index))):
                written.setdefault((b, k, y, x), []).append((t, n))
            for b, k, y, x in a.positive.nonzero().tolist():
                owner = int(a.box_truth[b, k, y, x])
                entries = written.get((b, k, y, x))
                if entries is None:
                    notes.append(f"truth_thresh: IoU {float(a.best_iou[b, k, y, x]):.3f}")
                    continue
                note = "; ".join(f"best of all anchors: #{n}" for _, n in entries[:1])
                if any(t != owner for t, _ in entries):
                    note += f"; box target of gt {owner}"
                notes.append(note)
        return notes

    # ------------------------------------------------------------------------------------------
    # darknet

    def _darknet_layer(
        self, x_in: torch.Tensor, a: DarknetLayerAssignment, tgt: torch.Tensor, mask: Sequence[int], cells: LayerCells
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], int, int]:
        nb, _, h, w = x_in.shape
        na, nc = len(mask), self.num_classes
        img_h, img_w = self.img_size
        x = x_in.reshape(nb, na, 5 + nc, h, w)
        dtype = x.dtype
        obj_logit = cells.obj
        noobj_mask = a.noobj

        bi, ai, yi, xi = cells.image, cells.anchor, cells.gy, cells.gx  # positive cells, flat-index order
        t = tgt[a.box_truth.reshape(-1).index_select(0, cells.flat)]
        anchors = torch.tensor([self.anchors[m] for m in mask], dtype=dtype, device=x.device)[ai]
        txy = torch.stack((t[:, 2] * w - xi.to(dtype), t[:, 3] * h - yi.to(dtype)), dim=1)
        twh = torch.stack((torch.log(t[:, 4] * img_w / anchors[:, 0]), torch.log(t[:, 5] * img_h / anchors[:, 1])), 1)
        scale = (2 - t[:, 4] * t[:, 5]) if self.box_scale == "2-wh" else torch.ones_like(t[:, 4])

        pos_obj = obj_logit.reshape(-1).index_select(0, cells.flat)
        noobj_logit = obj_logit[noobj_mask]
        terms = {
            "xy": bce_with_logits(cells.box[:, 0:2], txy, weight=scale[:, None], reduction="sum"),
            "wh": (mse_loss(cells.box[:, 2:4], twh, reduction="none") * scale[:, None]).sum() / 2,
            "obj": bce_with_logits(pos_obj, torch.ones_like(pos_obj), reduction="sum"),
            "noobj": bce_with_logits(noobj_logit, torch.zeros_like(noobj_logit), reduction="sum"),
            "cls": bce_with_logits(cells.cls, self._darknet_class_targets(x, a, tgt, cells), reduction="sum"),
        }

        # darknet's printed figures (its float outputs: sigmoid in double, stored as float)
        count = int(a.truth.numel())
        p_cells = torch.sigmoid(x.detach()[a.image, a.anchor, :, a.gy, a.gx].double()).float()  # [count, 5 + C]
        p_obj = torch.sigmoid(obj_logit.detach().double()).float()
        cls_of = tgt[a.truth, 1].long()
        iou = a.iou.double()
        stats = {
            "avg_iou": _mean_or_none(float(iou.sum()), count),
            "class": _mean_or_none(float(p_cells[torch.arange(count), 5 + cls_of].double().sum()), count),
            "obj": _mean_or_none(float(p_cells[:, 4].double().sum()), count),
            "no_obj": _mean_or_none(float(p_obj.double().sum()), p_obj.numel()),
            "recall50": _mean_or_none(float((iou > 0.5).sum()), count),
            "recall75": _mean_or_none(float((iou > 0.75).sum()), count),
            "count": count,
        }
        return terms, stats, int(bi.numel()), int((a.ignore & ~a.positive).sum())

    def _darknet_class_targets(
        self, x: torch.Tensor, a: DarknetLayerAssignment, tgt: torch.Tensor, cells: LayerCells
    ) -> torch.Tensor:
        """Class targets of the positive cells after every ``delta_yolo_class`` write, in order:
        the truth_thresh branch first, then the truth pass in truth order. A write replaces the
        whole one-hot vector when the cell's class-0 delta is 0 (first write, or ``p_0`` equal to
        its current target), else only sets its own class. The loop runs over the depth of
        writes into one cell (1 or 2 in practice), never over truths."""
        nb, na, _, h, w = x.shape
        nc = self.num_classes
        bi, ai, yi, xi = cells.image, cells.anchor, cells.gy, cells.gx
        pos_cells = cells.flat  # sorted ascending
        thr = a.thresh.reshape(-1).nonzero()[:, 0]
        cell_tp = flat_cells((nb, na, h, w), a.image, a.anchor, a.gy, a.gx)
        cell = torch.cat((thr, cell_tp))
        cls = torch.cat((tgt[a.best_truth.reshape(-1)[thr], 1].long(), tgt[a.truth, 1].long()))
        order = torch.cat((torch.zeros_like(thr), torch.arange(1, cell_tp.numel() + 1, device=x.device)))
        target = torch.zeros((pos_cells.numel(), nc), dtype=x.dtype, device=x.device)
        if cell.numel() == 0:
            return target
        key = cell * (cell_tp.numel() + 1) + order
        srt = torch.argsort(key)
        cell, cls = cell[srt], cls[srt]
        u = torch.searchsorted(pos_cells, cell)  # row of each write in `target`
        first = torch.ones_like(cell, dtype=torch.bool)
        first[1:] = cell[1:] != cell[:-1]
        start = torch.cummax(torch.where(first, torch.arange(cell.numel(), device=x.device), 0), 0).values
        rank = torch.arange(cell.numel(), device=x.device) - start
        p0 = torch.sigmoid(x.detach()[bi, ai, 5, yi, xi].double()).float()  # darknet's output at class 0
        eye = torch.eye(nc, dtype=x.dtype, device=x.device)
        for r in range(int(rank.max()) + 1):
            sel = rank == r
            uu, cc = u[sel], cls[sel]
            onehot = eye[cc]
            if r == 0:
                target[uu] = onehot
                continue
            cur = target[uu].clone()
            reset = cur[:, 0].float() == p0[uu]  # darknet: if (delta[index]) ... with delta = t0 - p0
            cur[torch.arange(cc.numel(), device=x.device), cc] = 1
            target[uu] = torch.where(reset[:, None], onehot, cur)
        return target

    # ------------------------------------------------------------------------------------------
    # PyTorch-YOLOv3

    def _pytorch_yolov3_layer(
        self, x_in: torch.Tensor, a: PyTorchYOLOv3LayerAssignment, tgt: torch.Tensor, mask: Sequence[int],
        cells: LayerCells, divisors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], int, int, torch.Tensor]:
        """The layer's parts (means over its object / no-object cells, or sums over the
        ``divisors`` (object, no-object) given), its metrics, counts and the object cells' IoUs."""
        nb, _, h, w = x_in.shape
        na, nc = len(mask), self.num_classes
        img_h, img_w = self.img_size
        dtype, device = x_in.dtype, x_in.device
        obj, noobj = a.obj_mask, a.noobj_mask
        # sigmoid of the whole confidence map; of the other entries only at the object cells
        conf = torch.sigmoid(cells.obj)
        sxy = torch.sigmoid(cells.box[:, 0:2])
        sx, sy, pcls = sxy[:, 0], sxy[:, 1], torch.sigmoid(cells.cls)
        tw_pred, th_pred = cells.box[:, 2], cells.box[:, 3]

        bi, ai, yi, xi = cells.image, cells.anchor, cells.gy, cells.gx  # the object cells, cell order
        n_obj = int(bi.numel())
        rows = a.cell_truth.reshape(-1).index_select(0, cells.flat)
        t = tgt[rows]
        scaled = torch.tensor(
            [(self.anchors[m][0] / (img_w / w), self.anchors[m][1] / (img_h / h)) for m in mask], dtype=dtype, device=device
        )
        gx, gy, gw, gh = t[:, 2] * w, t[:, 3] * h, t[:, 4] * w, t[:, 5] * h
        tx, ty = gx - gx.floor(), gy - gy.floor()
        tw = torch.log(gw / scaled[ai, 0] + _PV3_EPS)
        th = torch.log(gh / scaled[ai, 1] + _PV3_EPS)
        lam = 2 - gw / w * gh / h if self.box_scale == "2-wh" else None

        def mean(loss: torch.Tensor, divisor: Optional[torch.Tensor]) -> torch.Tensor:
            """The mean of ``loss`` (0 when empty), or its sum over ``divisor``."""
            if divisor is None:
                return loss.mean() if loss.numel() else loss.sum()
            return loss.sum() / divisor

        div_obj, div_noobj = (None, None) if divisors is None else divisors

        def box_term(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if lam is None:
                return mean(mse_loss(pred, target, reduction="none"), div_obj)
            loss = mse_loss(pred, target, reduction="none") * lam
            return loss.sum() / (max(n_obj, 1) if div_obj is None else div_obj)

        # one-hot union over every truth of the cell (tcls[b, best_n, gj, gi, label] = 1)
        slot = torch.full((nb * na * h * w,), -1, dtype=torch.long, device=device)
        slot[cells.flat] = torch.arange(n_obj, device=device)
        tcls = torch.zeros((n_obj, nc), dtype=dtype, device=device)
        tcls[slot[flat_cells((nb, na, h, w), a.image, a.anchor, a.gy, a.gx)], tgt[a.truth, 1].long()] = 1

        lx, ly = box_term(sx, tx), box_term(sy, ty)
        lw, lh = box_term(tw_pred, tw), box_term(th_pred, th)
        c_obj, c_noobj = conf[obj], conf[noobj]
        l_obj = mean(binary_cross_entropy(c_obj, torch.ones_like(c_obj), reduction="none"), div_obj)
        l_noobj = mean(binary_cross_entropy(c_noobj, torch.zeros_like(c_noobj), reduction="none"), div_noobj)
        l_cls = mean(binary_cross_entropy(pcls, tcls, reduction="none"), None if div_obj is None else div_obj * nc)
        terms = {"xy": lx + ly, "wh": lw + lh, "obj": l_obj, "noobj": l_noobj, "cls": l_cls}
        weighted = {k: v * self.gains[k] for k, v in terms.items()}

        # the layer's metrics, as YOLOLayer computes them (grid units, +1 pixel IoU convention)
        with torch.no_grad():
            labels = t[:, 1].long()
            class_ok = (pcls.argmax(-1) == labels).to(dtype)
            anchor_grid = scaled[ai]
            pbox = torch.stack(
                (sx + xi.to(dtype), sy + yi.to(dtype),
                 torch.exp(tw_pred) * anchor_grid[:, 0], torch.exp(th_pred) * anchor_grid[:, 1]), -1
            )
            truth = torch.stack((gx, gy, gw, gh), -1)
            iou = _iou_plus_one(pbox, truth)
            finite = torch.cat((pbox[:, :2], pbox[:, 2:].clamp(max=math.exp(DECODE_MAX_LOG_SCALE))), -1)
            plain_iou = aligned_box_iou(finite, truth, box_format="cxcywh", validate=False)
            conf50 = conf > 0.5
            detected = conf50[obj].to(dtype) * class_ok
            n_conf50 = float(conf50.sum())
            hit50 = float(((iou > 0.5).to(dtype) * detected).sum())
            hit75 = float(((iou > 0.75).to(dtype) * detected).sum())
            stats = {
                "loss": float(sum(weighted.values())), "x": float(lx), "y": float(ly), "w": float(lw), "h": float(lh),
                "conf": float(weighted["obj"] + weighted["noobj"]), "cls": float(l_cls),
                "cls_acc": _mean_or_none(100 * float(class_ok.sum()), n_obj),
                "recall50": hit50 / (n_obj + _PV3_EPS), "recall75": hit75 / (n_obj + _PV3_EPS),
                "precision": hit50 / (n_conf50 + _PV3_EPS),
                "conf_obj": _mean_or_none(float(c_obj.sum()), n_obj),
                "conf_noobj": _mean_or_none(float(c_noobj.sum()), int(c_noobj.numel())),
                "grid_size": (h, w),
            }
        return terms, stats, n_obj, int((~obj & ~noobj).sum()), plain_iou


def _iou_plus_one(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """PyTorch-YOLOv3 ``bbox_iou(x1y1x2y2=False)`` of aligned centre-form boxes: areas with the
    "+1 pixel" convention (here in grid units), ``1e-16`` in the denominator."""
    a1, a2 = cxcywh_to_xyxy(b1).split(2, -1)
    c1, c2 = cxcywh_to_xyxy(b2).split(2, -1)
    inter = (torch.minimum(a2, c2) - torch.maximum(a1, c1) + 1).clamp(min=0).prod(-1)
    area1 = (a2 - a1 + 1).prod(-1)
    area2 = (c2 - c1 + 1).prod(-1)
    return inter / (area1 + area2 - inter + _PV3_EPS)
