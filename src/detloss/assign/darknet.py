"""YOLOv3 target assignment: darknet's ``forward_yolo_layer`` and the PyTorch-YOLOv3 ``build_targets``.

Two pure functions, usable without any loss (for instance by a drawing tool):

* :func:`assign_darknet` reproduces the decisions of pjreddie/darknet ``src/yolo_layer.c``:

  1. *ignore pass* -- every prediction (decoded with its layer's own anchor) is compared with every
     truth of its image; ``best_iou > ignore_thresh`` removes its no-object term and
     ``best_iou > truth_thresh`` pulls it toward that best truth (the "truth_thresh branch").
     Vectorized: one ``[B, P, T]`` IoU tensor per chunk of predictions, never a loop over truths.
  2. *truth pass* -- each truth takes the best anchor over ALL anchors by shape IoU (boxes centred
     at the origin); only the layer whose mask holds that anchor writes it, at the cell
     ``(int(cy * H), int(cx * W))``. Truths are written in their order, so a later truth at the
     same cell and anchor overwrites an earlier one's box target.

  The decisions are made in float32 with darknet's own arithmetic (centre-form IoU without eps,
  sigmoid in double rounded to float), so thresholds fall exactly where darknet's do.

* :func:`assign_pytorch_yolov3` reproduces eriklindernoren/PyTorch-YOLOv3 (d1041e0)
  ``utils/utils.py build_targets``: best anchor among the layer's own anchors by width-height IoU,
  anchors whose wh-IoU exceeds ``ignore_thresh`` leave the no-object set.

Targets are ``[N, 6]`` rows ``(image_index, class, cx, cy, w, h)`` normalized to 0..1; the row
index is the truth's identity (``truth`` fields below) and, within an image, its order.
Known difference from darknet's data format: darknet ends an image's truth list at the first
``x == 0``; here every row counts. A centre at exactly 1.0 is put in the last cell (darknet and
PyTorch-YOLOv3 index one past the grid there).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch

from .._checks import check_finite, check_floating, check_like_first
from ..boxes import check_yolo_targets, cxcywh_to_xyxy, image_slots
from .base import PerLevelAssignment, cell_index

__all__ = [
    "DarknetAssignment",
    "PyTorchYOLOv3Assignment",
    "DarknetLayerAssignment",
    "PyTorchYOLOv3LayerAssignment",
    "assign_darknet",
    "assign_pytorch_yolov3",
    "check_yolo_layers",
    "check_darknet_targets",
    "darknet_iou",
]

# Upper bound on the elements of one [B, P, T] IoU block in the ignore pass: 2 MiB temporaries
# (at 100 truths per image, batch 16, 640 px: 176 ms and 57 MB peak, against 239 ms and 112 MB
# with blocks of 2**22).
_IOU_BLOCK_ELEMENTS = 1 << 19


@dataclass
class DarknetLayerAssignment:
    """What darknet decides for one YOLO layer with grid ``H x W`` and ``A = len(mask)`` anchor slots.

    Positives of the truth pass, one entry per truth whose best anchor is in this layer's mask,
    in truth order (a later entry at the same ``(image, anchor, gy, gx)`` overwrites an earlier one):

    Attributes:
        image: int64 ``[P]`` image index.
        anchor: int64 ``[P]`` anchor slot within the layer (``0 .. A-1``).
        gy, gx: int64 ``[P]`` cell row and column.
        truth: int64 ``[P]`` row of ``targets``.
        anchor_index: int64 ``[P]`` index into the full anchor list (``mask[anchor]``).
        iou: float32 ``[P]`` IoU of the prediction at the entry's cell and anchor with its truth
            (darknet's "Avg IOU" and recall figures).
        best_iou: float32 ``[B, A, H, W]`` each prediction's best IoU over its image's truths.
        best_truth: int64 ``[B, A, H, W]`` the row of that truth (first one on ties), -1 where
            ``best_iou`` is 0.
        ignore: bool ``[B, A, H, W]`` ``best_iou > ignore_thresh``: no no-object term.
        thresh: bool ``[B, A, H, W]`` ``best_iou > truth_thresh``: the truth_thresh branch
            (objectness, class and box pulled toward ``best_truth``).
        positive: bool ``[B, A, H, W]`` cells with an object term (``thresh`` or a truth-pass entry).
        box_truth: int64 ``[B, A, H, W]`` row whose box target the cell finally gets (the last
            writer: truth-pass entries in order after the truth_thresh branch), -1 elsewhere.
    """

    image: torch.Tensor
    anchor: torch.Tensor
    gy: torch.Tensor
    gx: torch.Tensor
    truth: torch.Tensor
    anchor_index: torch.Tensor
    iou: torch.Tensor
    best_iou: torch.Tensor
    best_truth: torch.Tensor
    ignore: torch.Tensor
    thresh: torch.Tensor
    positive: torch.Tensor
    box_truth: torch.Tensor

    @property
    def noobj(self) -> torch.Tensor:
        """bool ``[B, A, H, W]``: cells with a no-object term (neither positive nor ignored)."""
        return ~(self.ignore | self.positive)


@dataclass
class PyTorchYOLOv3LayerAssignment:
    """What PyTorch-YOLOv3's ``build_targets`` decides for one layer (every truth is assigned in
    every layer, to the best of the layer's own anchors).

    Attributes:
        image, anchor, gy, gx, truth: int64 ``[N]`` one entry per target row, in row order.
        wh_iou: float32 ``[N, A]`` width-height IoU of each truth with each of the layer's anchors.
        obj_mask: bool ``[B, A, H, W]`` cells with an object.
        noobj_mask: bool ``[B, A, H, W]`` cells with a no-object term (not an object cell, and no
            truth of the cell has wh-IoU above ``ignore_thresh`` with the anchor).
        cell_truth: int64 ``[B, A, H, W]`` the row whose targets the cell gets (the last one
            written), -1 elsewhere.
    """

    image: torch.Tensor
    anchor: torch.Tensor
    gy: torch.Tensor
    gx: torch.Tensor
    truth: torch.Tensor
    wh_iou: torch.Tensor
    obj_mask: torch.Tensor
    noobj_mask: torch.Tensor
    cell_truth: torch.Tensor


class DarknetAssignment(PerLevelAssignment):
    """What :func:`assign_darknet` returns: the cells with an object term of every layer, layer
    after layer (each in cell order), as an :class:`~detloss.assign.base.Assignment`, and the
    list of the layers' :class:`DarknetLayerAssignment` (``assignment[i]``, iteration).

    ``pred_index``: the cell of the layer's ``[A, H, W]`` predictions, layers concatenated;
    ``target_index`` the row of ``targets`` whose box target the cell gets (``box_truth``);
    ``boxes`` that row's ``(cx, cy, w, h)`` normalized; ``labels`` its class; ``weights`` ones;
    ``ignore`` the predictions without any objectness term (ignored and not positive).
    ``extras``: ``levels`` (the per-layer results), ``level`` (int64 ``[P]``), ``ignore_target``
    (int64 ``[B, A]``: the truth whose IoU put each prediction above the ignore threshold,
    ``best_truth``, -1 where none).
    """


class PyTorchYOLOv3Assignment(PerLevelAssignment):
    """What :func:`assign_pytorch_yolov3` returns, shaped as :class:`DarknetAssignment`: the object
    cells of every layer (``target_index`` the row written last into the cell, ``cell_truth``),
    ``ignore`` the cells in neither the object nor the no-object set, and the layers'
    :class:`PyTorchYOLOv3LayerAssignment` as ``extras["levels"]``."""


def _layers_assignment(cls, layers, positive, owner, ignore, rows: torch.Tensor, batch: int, **extras):
    """The positives of per-layer masks ``positive``, ``owner`` (row per cell), ``ignore``
    ``[B, A, H, W]``, layer after layer; ``extras`` per-layer ``[B, A, H, W]`` maps, flattened."""
    shapes = [tuple(p.shape[1:]) for p in positive]
    parts = [m.nonzero(as_tuple=True) for m in positive]
    target = torch.cat([o[b, a, y, x] for o, (b, a, y, x) in zip(owner, parts)])
    return cls(
        batch_index=torch.cat([b for b, _, _, _ in parts]),
        pred_index=torch.cat([cell_index(shapes, i, a, y, x) for i, (_, a, y, x) in enumerate(parts)]),
        target_index=target,
        boxes=rows[target, 2:6],
        labels=rows[target, 1].long(),
        weights=torch.ones(target.shape[0], dtype=rows.dtype, device=rows.device),
        batch_size=batch,
        num_preds=sum(a * h * w for a, h, w in shapes),
        ignore=torch.cat([m.flatten(1) for m in ignore], 1),
        extras={
            "levels": layers,
            "level": torch.cat([torch.full_like(b, i) for i, (b, _, _, _) in enumerate(parts)]),
            **{k: torch.cat([m.flatten(1) for m in v], 1) for k, v in extras.items()},
        },
    )


# ----------------------------------------------------------------------------------------------
# checks


def check_yolo_layers(
    inputs: Sequence[torch.Tensor],
    masks: Sequence[Sequence[int]],
    num_classes: int,
    img_size: Tuple[int, int],
    strides: Sequence[int],
) -> None:
    """``inputs[i]`` must be ``[B, len(masks[i]) * (5 + num_classes), img_h / strides[i], img_w / strides[i]]``,
    with finite values (one synchronization for all layers)."""
    if isinstance(inputs, torch.Tensor) or not isinstance(inputs, (list, tuple)):
        raise TypeError(f"inputs: expected a list of {len(masks)} layer tensors, got {type(inputs).__name__}")
    if len(inputs) != len(masks):
        raise ValueError(f"inputs: expected {len(masks)} layer tensors (one per mask), got {len(inputs)}")
    img_h, img_w = img_size
    for i, (x, mask, stride) in enumerate(zip(inputs, masks, strides)):
        name = f"inputs[{i}]"
        check_floating(name, x)
        ch = len(mask) * (5 + num_classes)
        if x.ndim != 4 or x.shape[1] != ch:
            raise ValueError(
                f"{name}: expected shape [B, {ch}, H, W] ({len(mask)} anchors x (5 + {num_classes} classes)), "
                f"got {tuple(x.shape)}"
            )
        grid = (img_h // stride, img_w // stride)
        if tuple(x.shape[2:]) != grid:
            raise ValueError(
                f"{name}: expected grid {grid} (img_size {(img_h, img_w)} / stride {stride}), "
                f"got {tuple(x.shape[2:])}"
            )
        check_like_first(name, x, "inputs[0]", inputs[0])
    check_finite([f"inputs[{i}]" for i in range(len(inputs))], inputs)


def check_darknet_targets(targets: object, batch_size: int, num_classes: int) -> torch.Tensor:
    """YOLO rows ``(image_index, class, cx, cy, w, h)`` as :func:`detloss.boxes.check_yolo_targets`
    checks them (finite, integer image index < ``batch_size``, integer class < ``num_classes``,
    coordinates in [0, 1]), and sizes ``w, h > 0``: YOLOv3's targets ``log(w img_w / anchor_w)``
    have no value for an empty box."""
    t = check_yolo_targets(targets, num_classes=num_classes, batch_size=batch_size)
    wh = t[:, 4:6].detach().float()
    bad = (wh <= 0).any(1) | (wh[:, 0] * wh[:, 1] <= 0)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(
            f"targets: expected w, h > 0 with a float32 area w*h > 0 (YOLOv3 takes log(w)), "
            f"got {t[r, 2:6].tolist()} in row {r}"
        )
    return t


# ----------------------------------------------------------------------------------------------
# darknet


def darknet_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """darknet ``box_iou`` (box.c) on centre-form boxes ``[..., 4]`` (broadcast), operation for
    operation: no eps; a 0/0 (two empty boxes, or an infinite box) counts as 0 as darknet's
    ``iou > best`` comparison treats NaN."""
    ax, ay, aw, ah = a.unbind(-1)
    bx, by, bw, bh = b.unbind(-1)

    def overlap(x1, w1, x2, w2):
        left = torch.maximum(x1 - w1 / 2, x2 - w2 / 2)
        right = torch.minimum(x1 + w1 / 2, x2 + w2 / 2)
        return right - left

    ow = overlap(ax, aw, bx, bw)
    oh = overlap(ay, ah, by, bh)
    inter = torch.where((ow < 0) | (oh < 0), torch.zeros_like(ow), ow * oh)
    union = aw * ah + bw * bh - inter
    return torch.nan_to_num(inter / union, nan=0.0, posinf=0.0, neginf=0.0)


def _darknet_logistic(x: torch.Tensor) -> torch.Tensor:
    """darknet's ``logistic_activate``: ``1./(1. + exp(-x))`` in double, stored as float."""
    return torch.sigmoid(x.detach().double()).float()


def _pad_truths(targets32: torch.Tensor, batch: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-image truth table: boxes ``[B, T, 4]`` (cx, cy, w, h) and rows ``[B, T]`` (-1 = padding),
    keeping each image's row order; ``T`` is the largest count of truths in one image."""
    img = targets32[:, 0].long()
    slot, t_max = image_slots(img, batch)
    rows = torch.full((batch, t_max), -1, dtype=torch.long, device=targets32.device)
    rows[img, slot] = torch.arange(img.numel(), device=targets32.device)
    boxes = torch.zeros((batch, t_max, 4), dtype=torch.float32, device=targets32.device)
    boxes[img, slot] = targets32[:, 2:6]
    return boxes, rows


def _best_truth_iou(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Best darknet IoU of each prediction over its image's truths, and that truth's slot.

    pred ``[B, P, 4]``, truth ``[B, T, 4]``, valid ``[B, T]`` -> (best_iou ``[B, P]``, slot ``[B, P]``).
    All truths at once; predictions in blocks so that one block holds at most
    ``_IOU_BLOCK_ELEMENTS`` IoUs. Ties keep the first truth, as darknet's strict ``>`` does.

    The same float32 operations as :func:`darknet_iou` (edges ``x -/+ w/2``, overlap
    ``min(right) - max(left)``, intersection 0 when an overlap is negative, union
    ``area_pred + area_truth - inter``), with the per-box terms computed once. Padding slots get
    an empty box and an infinite area, so their IoU is exactly 0; valid truths have a positive
    area (checked on input), so a 0/0 cannot occur.
    """
    b, p, _ = pred.shape
    t = truth.shape[1]
    best = pred.new_zeros((b, p))
    slot = torch.zeros((b, p), dtype=torch.long, device=pred.device)
    if t == 0 or p == 0:
        return best, slot

    def edges(box):
        x1, y1, x2, y2 = cxcywh_to_xyxy(box).unbind(-1)
        return x1, x2, y1, y2, box[..., 2] * box[..., 3]

    tx1, tx2, ty1, ty2, ta = (v[:, None, :] for v in edges(truth))
    ta = ta.masked_fill(~valid[:, None, :], float("inf"))
    px1, px2, py1, py2, pa = (v[:, :, None] for v in edges(pred))
    step = max(1, _IOU_BLOCK_ELEMENTS // max(1, b * t))
    for s in range(0, p, step):
        blk = slice(s, s + step)
        ow = torch.minimum(px2[:, blk], tx2).sub_(torch.maximum(px1[:, blk], tx1)).clamp_(min=0)
        oh = torch.minimum(py2[:, blk], ty2).sub_(torch.maximum(py1[:, blk], ty1)).clamp_(min=0)
        inter = ow.mul_(oh)
        iou = inter.div_((pa[:, blk] + ta).sub_(inter))
        best[:, blk], slot[:, blk] = iou.max(dim=2)
    # a prediction of area inf * 0 (NaN) has NaN IoU with every truth; darknet's `iou > best` then
    # never holds and its best IoU stays 0
    return best.nan_to_num_(nan=0.0), slot


def _decode_darknet(x: torch.Tensor, anchors_px: torch.Tensor, net_hw: Tuple[int, int]) -> torch.Tensor:
    """darknet ``get_yolo_box`` for a whole layer: raw ``[B, A, 5+C, H, W]`` -> boxes ``[B, A, H, W, 4]``
    (cx, cy, w, h normalized; float32 with darknet's rounding)."""
    _, _, _, h, w = x.shape
    net_h, net_w = net_hw
    xy = _darknet_logistic(x[:, :, 0:2])
    gx = torch.arange(w, dtype=torch.float32, device=x.device)
    gy = torch.arange(h, dtype=torch.float32, device=x.device)[:, None]
    bx = (gx + xy[:, :, 0]) / w
    by = (gy + xy[:, :, 1]) / h
    a = anchors_px.double()[None, :, :, None, None]
    ewh = torch.exp(x[:, :, 2:4].detach().double())
    bw = (ewh[:, :, 0:1] * a[:, :, 0:1] / net_w).float()[:, :, 0]
    bh = (ewh[:, :, 1:2] * a[:, :, 1:2] / net_h).float()[:, :, 0]
    return torch.stack((bx, by, bw, bh), dim=-1)


def _cells(cxcy: torch.Tensor, h: int, w: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """darknet's ``i = truth.x * l.w`` (float32 product, truncated), clamped into the grid."""
    gx = (cxcy[:, 0] * w).long().clamp_(0, w - 1)
    gy = (cxcy[:, 1] * h).long().clamp_(0, h - 1)
    return gy, gx


def assign_darknet(
    inputs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    anchors: Sequence[Sequence[float]],
    masks: Sequence[Sequence[int]],
    img_size: Tuple[int, int],
    ignore_thresh: float = 0.7,
    truth_thresh: float = 1.0,
) -> DarknetAssignment:
    """Darknet's YOLOv3 assignment for every layer (see the module docstring).

    Args:
        inputs: raw layer inputs ``[B, len(masks[i]) * (5 + C), H_i, W_i]`` in darknet's channel
            layout (anchor slot ``a``, entry ``e`` at channel ``a * (5 + C) + e``).
        targets: ``[N, 6]`` rows ``(image_index, class, cx, cy, w, h)`` normalized, in darknet's
            truth order per image. Not validated here (see :func:`check_darknet_targets`).
        anchors: all anchors ``(w, h)`` in pixels of the network input.
        masks: ``masks[i]`` the anchor indices of layer ``i`` (yolov3.cfg's ``mask``).
        img_size: network input ``(h, w)`` in pixels (darknet's ``net.h, net.w``).

    Returns:
        a :class:`DarknetAssignment`, also one :class:`DarknetLayerAssignment` per layer, in the
        order of ``inputs``.
    """
    net_h, net_w = img_size
    dev = inputs[0].device
    batch = inputs[0].shape[0]
    t32 = targets.detach().to(device=dev, dtype=torch.float32)
    n = t32.shape[0]
    anchors_px = torch.as_tensor(anchors, dtype=torch.float32, device=dev).reshape(-1, 2)
    truth_boxes, truth_rows = _pad_truths(t32, batch)
    truth_valid = truth_rows >= 0

    # truth pass, part shared by all layers: best anchor over ALL anchors by shape IoU at the origin.
    anchor_wh = torch.stack((anchors_px[:, 0] / net_w, anchors_px[:, 1] / net_h), dim=-1)
    zeros = torch.zeros_like(anchor_wh)
    shape_iou = darknet_iou(
        torch.cat((zeros, anchor_wh), -1)[None, :, :], torch.cat((torch.zeros_like(t32[:, 4:6]), t32[:, 4:6]), -1)[:, None, :]
    )  # [N, K]
    best_n = shape_iou.argmax(dim=1) if n else torch.zeros(0, dtype=torch.long, device=dev)
    rows_all = torch.arange(n, device=dev)

    out = []
    for x_raw, mask in zip(inputs, masks):
        nb, _, h, w = x_raw.shape
        na = len(mask)
        mask_t = torch.as_tensor(list(mask), dtype=torch.long, device=dev)
        x = x_raw.detach().reshape(nb, na, x_raw.shape[1] // na, h, w)
        pred = _decode_darknet(x, anchors_px[mask_t], (net_h, net_w))  # [B, A, H, W, 4]

        best_iou, slot = _best_truth_iou(pred.reshape(nb, na * h * w, 4), truth_boxes, truth_valid)
        best_iou = best_iou.reshape(nb, na, h, w)
        if truth_rows.shape[1]:
            best_truth = torch.gather(truth_rows, 1, slot).reshape(nb, na, h, w)
        else:
            best_truth = torch.full((nb, na, h, w), -1, dtype=torch.long, device=dev)
        best_truth = torch.where(best_iou > 0, best_truth, torch.full_like(best_truth, -1))
        ignore = best_iou > ignore_thresh
        thresh = best_iou > truth_thresh

        # truth pass for this layer
        in_layer = (best_n[:, None] == mask_t[None, :])  # [N, A]
        sel = in_layer.any(1)
        rows = rows_all[sel]
        anchor = in_layer[sel].long().argmax(1)
        img = t32[rows, 0].long()
        gy, gx = _cells(t32[rows, 2:4], h, w)

        iou = darknet_iou(pred[img, anchor, gy, gx], t32[rows, 2:6])
        cell = ((img * na + anchor) * h + gy) * w + gx
        last = torch.full((nb * na * h * w,), -1, dtype=torch.long, device=dev)
        last.scatter_reduce_(0, cell, rows, reduce="amax", include_self=True)
        last = last.reshape(nb, na, h, w)
        box_truth = torch.where(last >= 0, last, torch.where(thresh, best_truth, torch.full_like(last, -1)))
        out.append(
            DarknetLayerAssignment(
                image=img, anchor=anchor, gy=gy, gx=gx, truth=rows, anchor_index=mask_t[anchor], iou=iou,
                best_iou=best_iou, best_truth=best_truth, ignore=ignore, thresh=thresh,
                positive=box_truth >= 0, box_truth=box_truth,
            )
        )
    return _layers_assignment(
        DarknetAssignment, out, [a.positive for a in out], [a.box_truth for a in out],
        [a.ignore & ~a.positive for a in out], t32, batch, ignore_target=[a.best_truth for a in out],
    )


# ----------------------------------------------------------------------------------------------
# PyTorch-YOLOv3


def _wh_iou(anchor_wh: torch.Tensor, gwh: torch.Tensor) -> torch.Tensor:
    """PyTorch-YOLOv3 ``bbox_wh_iou``: anchors ``[A, 2]`` x truths ``[N, 2]`` -> ``[N, A]``."""
    w1, h1 = anchor_wh[None, :, 0], anchor_wh[None, :, 1]
    w2, h2 = gwh[:, None, 0], gwh[:, None, 1]
    inter = torch.minimum(w1, w2) * torch.minimum(h1, h2)
    union = (w1 * h1 + 1e-16) + w2 * h2 - inter
    return inter / union


def assign_pytorch_yolov3(
    inputs: Sequence[torch.Tensor],
    targets: torch.Tensor,
    anchors: Sequence[Sequence[float]],
    masks: Sequence[Sequence[int]],
    img_size: Tuple[int, int],
    ignore_thresh: float = 0.5,
) -> PyTorchYOLOv3Assignment:
    """PyTorch-YOLOv3's ``build_targets`` for every layer (see the module docstring).

    Each layer scales the truths to its grid (``cx * W``, ``cy * H``) and its own anchors to grid
    units (``anchor / stride`` with ``stride = img / grid``), takes the best of its anchors by
    width-height IoU, and drops from the no-object set every anchor of the truth's cell whose
    wh-IoU exceeds ``ignore_thresh``. Arguments as in :func:`assign_darknet`.

    Returns:
        a :class:`PyTorchYOLOv3Assignment`, also one :class:`PyTorchYOLOv3LayerAssignment` per
        layer, in the order of ``inputs``.
    """
    img_h, img_w = img_size
    dev = inputs[0].device
    t32 = targets.detach().to(device=dev, dtype=torch.float32)
    n = t32.shape[0]
    rows = torch.arange(n, device=dev)
    img = t32[:, 0].long()
    out = []
    for x_raw, mask in zip(inputs, masks):
        nb, _, h, w = x_raw.shape
        na = len(mask)
        scaled = torch.tensor(
            [(anchors[m][0] / (img_w / w), anchors[m][1] / (img_h / h)) for m in mask], dtype=torch.float32, device=dev
        ).reshape(-1, 2)
        gwh = t32[:, 4:6] * torch.tensor([w, h], dtype=torch.float32, device=dev)
        wh_iou = _wh_iou(scaled, gwh)  # [N, A]
        best = wh_iou.argmax(1) if n else torch.zeros(0, dtype=torch.long, device=dev)
        gy, gx = _cells(t32[:, 2:4], h, w)

        size = nb * na * h * w
        cell = ((img * na + best) * h + gy) * w + gx
        last = torch.full((size,), -1, dtype=torch.long, device=dev)
        last.scatter_reduce_(0, cell, rows, reduce="amax", include_self=True)
        obj = last >= 0
        noobj = torch.ones(size, dtype=torch.bool, device=dev)
        all_a = torch.arange(na, device=dev)
        cells_all = ((img[:, None] * na + all_a[None, :]) * h + gy[:, None]) * w + gx[:, None]
        noobj[cells_all[wh_iou > ignore_thresh]] = False
        noobj[cell] = False
        out.append(
            PyTorchYOLOv3LayerAssignment(
                image=img, anchor=best, gy=gy, gx=gx, truth=rows, wh_iou=wh_iou,
                obj_mask=obj.reshape(nb, na, h, w), noobj_mask=noobj.reshape(nb, na, h, w),
                cell_truth=last.reshape(nb, na, h, w),
            )
        )
    return _layers_assignment(
        PyTorchYOLOv3Assignment, out, [a.obj_mask for a in out], [a.cell_truth for a in out],
        [~a.obj_mask & ~a.noobj_mask for a in out], t32, inputs[0].shape[0],
    )
