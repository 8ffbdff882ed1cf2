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
``grid_size``) -- plus ``num_pos`` (cells with an object term) and ``num_ignored`` (cells with no
objectness term at all).

Inputs may be float16/bfloat16: the loss is computed in float32 (float64 inputs in float64);
the assignment decisions are always made in float32, as darknet makes them.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._checks import as_pair, check_choice, compute_dtype, upcast
from ..assign.darknet import (
    DarknetLayerAssignment,
    PyTorchYOLOv3LayerAssignment,
    assign_darknet,
    assign_pytorch_yolov3,
    check_yolo_layers,
    check_darknet_targets,
)
from ..functional import bce_with_logits, binary_cross_entropy, mse_loss
from ..output import LossOutput

__all__ = ["YOLOv3Loss", "YOLOV3_ANCHORS", "YOLOV3_MASKS", "FLAVORS", "BOX_SCALES"]

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


class YOLOv3Loss(torch.nn.Module):
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
            confidence terms (defaults 1 and 100).

    Call: ``loss_fn(inputs, targets) -> LossOutput`` with ``inputs`` a list of raw layer inputs
    ``[B, len(masks[i]) * (5 + C), img_h / strides[i], img_w / strides[i]]`` (channel
    ``a * (5 + C) + e``: entry ``e`` = tx, ty, tw, th, objectness, classes of anchor slot ``a``) and
    ``targets`` ``[N, 6]`` rows ``(image_index, class, cx, cy, w, h)`` normalized to 0..1, in
    darknet's truth order per image. Stateless: no value is kept between calls.
    """

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
    ) -> None:
        super().__init__()
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
        if flavor == "darknet" and (obj_scale is not None or noobj_scale is not None):
            raise ValueError("obj_scale, noobj_scale: only the 'pytorch-yolov3' flavor has them (darknet weighs 1)")
        self.obj_scale = _PV3_OBJ_SCALE if obj_scale is None else _number("obj_scale", obj_scale)
        self.noobj_scale = _PV3_NOOBJ_SCALE if noobj_scale is None else _number("noobj_scale", noobj_scale)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, flavor={self.flavor!r}, img_size={self.img_size}, "
            f"ignore_thresh={self.ignore_thresh}, truth_thresh={self.truth_thresh}, box_scale={self.box_scale!r}"
        )

    # ------------------------------------------------------------------------------------------

    def forward(self, inputs: Sequence[torch.Tensor], targets: torch.Tensor) -> LossOutput:
        check_yolo_layers(inputs, self.masks, self.num_classes, self.img_size, self.strides)
        check_darknet_targets(targets, inputs[0].shape[0], self.num_classes)
        dtype = compute_dtype(*inputs)
        tgt = targets.detach().to(device=inputs[0].device, dtype=dtype)
        if self.flavor == "darknet":
            asg = assign_darknet(
                inputs, targets, self.anchors, self.masks, self.img_size, self.ignore_thresh, self.truth_thresh
            )
            layer = self._darknet_layer
        else:
            asg = assign_pytorch_yolov3(inputs, targets, self.anchors, self.masks, self.img_size, self.ignore_thresh)
            layer = self._pytorch_yolov3_layer
        total = inputs[0].new_zeros((), dtype=dtype)
        components = {c: torch.zeros((), dtype=dtype, device=inputs[0].device) for c in COMPONENTS}
        layers = []
        num_pos = num_ignored = 0
        for x, a, mask in zip(inputs, asg, self.masks):
            terms, stats, npos, nign = layer(upcast(x, dtype), a, tgt, mask)
            for c in COMPONENTS:
                total = total + terms[c]
                components[c] = components[c] + terms[c].detach()
            layers.append(stats)
            num_pos += npos
            num_ignored += nign
        return LossOutput(
            total=total,
            components=components,
            stats={"layers": layers, "num_pos": num_pos, "num_ignored": num_ignored},
        )

    # ------------------------------------------------------------------------------------------
    # darknet

    def _darknet_layer(
        self, x_in: torch.Tensor, a: DarknetLayerAssignment, tgt: torch.Tensor, mask: Sequence[int]
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], int, int]:
        nb, _, h, w = x_in.shape
        na, nc = len(mask), self.num_classes
        img_h, img_w = self.img_size
        x = x_in.reshape(nb, na, 5 + nc, h, w)
        dtype = x.dtype
        obj_logit = x[:, :, 4]
        noobj_mask = a.noobj

        bi, ai, yi, xi = a.positive.nonzero(as_tuple=True)  # positive cells, flat-index order
        pred = x[bi, ai, :, yi, xi]  # [P, 5 + C]
        t = tgt[a.box_truth[bi, ai, yi, xi]]
        anchors = torch.tensor([self.anchors[m] for m in mask], dtype=dtype, device=x.device)[ai]
        txy = torch.stack((t[:, 2] * w - xi.to(dtype), t[:, 3] * h - yi.to(dtype)), dim=1)
        twh = torch.stack((torch.log(t[:, 4] * img_w / anchors[:, 0]), torch.log(t[:, 5] * img_h / anchors[:, 1])), 1)
        scale = (2 - t[:, 4] * t[:, 5]) if self.box_scale == "2-wh" else torch.ones_like(t[:, 4])

        terms = {
            "xy": bce_with_logits(pred[:, 0:2], txy, weight=scale[:, None], reduction="sum"),
            "wh": (mse_loss(pred[:, 2:4], twh, reduction="none") * scale[:, None]).sum() / 2,
            "obj": bce_with_logits(pred[:, 4], torch.ones_like(pred[:, 4]), reduction="sum"),
            "noobj": bce_with_logits(obj_logit[noobj_mask], torch.zeros_like(obj_logit[noobj_mask]), reduction="sum"),
            "cls": bce_with_logits(pred[:, 5:], self._darknet_class_targets(x, a, tgt, (bi, ai, yi, xi)), reduction="sum"),
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
            "no_obj": float(p_obj.double().mean()),
            "recall50": _mean_or_none(float((iou > 0.5).sum()), count),
            "recall75": _mean_or_none(float((iou > 0.75).sum()), count),
            "count": count,
        }
        return terms, stats, int(bi.numel()), int((a.ignore & ~a.positive).sum())

    def _darknet_class_targets(
        self, x: torch.Tensor, a: DarknetLayerAssignment, tgt: torch.Tensor, cells: Tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        """Class targets of the positive cells after every ``delta_yolo_class`` write, in order:
        the truth_thresh branch first, then the truth pass in truth order. A write replaces the
        whole one-hot vector when the cell's class-0 delta is 0 (first write, or ``p_0`` equal to
        its current target), else only sets its own class. The loop runs over the depth of
        writes into one cell (1 or 2 in practice), never over truths."""
        nb, na, _, h, w = x.shape
        nc = self.num_classes
        bi, ai, yi, xi = cells
        pos_cells = ((bi * na + ai) * h + yi) * w + xi  # sorted ascending
        thr = a.thresh.reshape(-1).nonzero()[:, 0]
        cell_tp = ((a.image * na + a.anchor) * h + a.gy) * w + a.gx
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
        self, x_in: torch.Tensor, a: PyTorchYOLOv3LayerAssignment, tgt: torch.Tensor, mask: Sequence[int]
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any], int, int]:
        nb, _, h, w = x_in.shape
        na, nc = len(mask), self.num_classes
        img_h, img_w = self.img_size
        pr = x_in.reshape(nb, na, 5 + nc, h, w).permute(0, 1, 3, 4, 2)  # [B, A, H, W, 5 + C]
        dtype = pr.dtype
        obj, noobj = a.obj_mask, a.noobj_mask
        # sigmoid of the whole confidence map; of the other entries only at the object cells
        conf = torch.sigmoid(pr[..., 4])
        p_obj = torch.sigmoid(pr[obj])  # [n_obj, 5 + C]
        sx, sy, pcls = p_obj[:, 0], p_obj[:, 1], p_obj[:, 5:]

        bi, ai, yi, xi = obj.nonzero(as_tuple=True)
        n_obj = int(bi.numel())
        rows = a.cell_truth[bi, ai, yi, xi]
        t = tgt[rows]
        scaled = torch.tensor(
            [(self.anchors[m][0] / (img_w / w), self.anchors[m][1] / (img_h / h)) for m in mask], dtype=dtype, device=pr.device
        )
        gx, gy, gw, gh = t[:, 2] * w, t[:, 3] * h, t[:, 4] * w, t[:, 5] * h
        tx, ty = gx - gx.floor(), gy - gy.floor()
        tw = torch.log(gw / scaled[ai, 0] + _PV3_EPS)
        th = torch.log(gh / scaled[ai, 1] + _PV3_EPS)
        lam = 2 - gw / w * gh / h if self.box_scale == "2-wh" else None

        def box_term(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            if lam is None:
                return mse_loss(pred, target, reduction="mean")
            return (mse_loss(pred, target, reduction="none") * lam).sum() / max(n_obj, 1)

        # one-hot union over every truth of the cell (tcls[b, best_n, gj, gi, label] = 1)
        slot = torch.full((nb * na * h * w,), -1, dtype=torch.long, device=pr.device)
        slot[((bi * na + ai) * h + yi) * w + xi] = torch.arange(n_obj, device=pr.device)
        tcls = torch.zeros((n_obj, nc), dtype=dtype, device=pr.device)
        tcls[slot[((a.image * na + a.anchor) * h + a.gy) * w + a.gx], tgt[a.truth, 1].long()] = 1

        lx, ly = box_term(sx, tx), box_term(sy, ty)
        lw, lh = box_term(pr[..., 2][obj], tw), box_term(pr[..., 3][obj], th)
        c_obj, c_noobj = conf[obj], conf[noobj]
        l_obj = self.obj_scale * binary_cross_entropy(c_obj, torch.ones_like(c_obj), reduction="mean")
        l_noobj = self.noobj_scale * binary_cross_entropy(c_noobj, torch.zeros_like(c_noobj), reduction="mean")
        l_cls = binary_cross_entropy(pcls, tcls, reduction="mean")
        terms = {"xy": lx + ly, "wh": lw + lh, "obj": l_obj, "noobj": l_noobj, "cls": l_cls}

        # the layer's metrics, as YOLOLayer computes them (grid units, +1 pixel IoU convention)
        with torch.no_grad():
            labels = t[:, 1].long()
            class_ok = (pcls.argmax(-1) == labels).to(dtype)
            anchor_grid = scaled[ai]
            pbox = torch.stack(
                (sx + xi.to(dtype), sy + yi.to(dtype),
                 torch.exp(pr[..., 2][obj]) * anchor_grid[:, 0], torch.exp(pr[..., 3][obj]) * anchor_grid[:, 1]), -1
            )
            iou = _iou_plus_one(pbox, torch.stack((gx, gy, gw, gh), -1))
            conf50 = conf > 0.5
            detected = conf50[obj].to(dtype) * class_ok
            n_conf50 = float(conf50.sum())
            hit50 = float(((iou > 0.5).to(dtype) * detected).sum())
            hit75 = float(((iou > 0.75).to(dtype) * detected).sum())
            stats = {
                "loss": float(sum(terms.values())), "x": float(lx), "y": float(ly), "w": float(lw), "h": float(lh),
                "conf": float(l_obj + l_noobj), "cls": float(l_cls),
                "cls_acc": _mean_or_none(100 * float(class_ok.sum()), n_obj),
                "recall50": hit50 / (n_obj + _PV3_EPS), "recall75": hit75 / (n_obj + _PV3_EPS),
                "precision": hit50 / (n_conf50 + _PV3_EPS),
                "conf_obj": _mean_or_none(float(c_obj.sum()), n_obj),
                "conf_noobj": _mean_or_none(float(c_noobj.sum()), int(c_noobj.numel())),
                "grid_size": (h, w),
            }
        return terms, stats, n_obj, int((~obj & ~noobj).sum())


def _iou_plus_one(b1: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
    """PyTorch-YOLOv3 ``bbox_iou(x1y1x2y2=False)`` of aligned centre-form boxes: areas with the
    "+1 pixel" convention (here in grid units), ``1e-16`` in the denominator."""
    a1, a2 = b1[:, :2] - b1[:, 2:] / 2, b1[:, :2] + b1[:, 2:] / 2
    c1, c2 = b2[:, :2] - b2[:, 2:] / 2, b2[:, :2] + b2[:, 2:] / 2
    inter = (torch.minimum(a2, c2) - torch.maximum(a1, c1) + 1).clamp(min=0).prod(-1)
    area1 = (a2 - a1 + 1).prod(-1)
    area2 = (c2 - c1 + 1).prod(-1)
    return inter / (area1 + area2 - inter + _PV3_EPS)
