"""Pictures and tables of target assignment: ``detloss assign SCHEME --image IMG --labels TXT``.

For each scheme the assigner of :mod:`detloss.assign` decides, for the ground-truth boxes of one
image, which cells / anchors / points of each pyramid level are positives (and, for YOLOv3,
which predictions are ignored); this module only draws and tabulates those decisions.

Schemes and their defaults (all overridable by keyword):

``yolov3``  darknet's ``forward_yolo_layer`` (:func:`detloss.assign.darknet.assign_darknet`),
            the 9 COCO anchors of yolov3.cfg, masks (0,1,2) (3,4,5) (6,7,8) on strides 8, 16, 32,
            ``ignore_thresh=0.7``. The ignore pass needs predictions: the picture uses the head's
            prior, all logits 0 (every prediction is its anchor centred in its cell), so "ignored"
            marks the anchors whose prior box already overlaps a truth by more than the threshold.
``yolov5``  ``ComputeLoss.build_targets`` of YOLOv5 v7.0 (:func:`detloss.assign.yolov5.assign_yolov5`):
            the P3-P5 anchors of yolov5s.yaml, ``anchor_t=4``; the own cell and the two nearest
            neighbour cells.
``fcos``    FCOS matching (:func:`detloss.assign.fcos.assign_fcos`), torchvision convention by
            default, strides 8..128, centre sampling radius 1.5.
``yolov8``  the task-aligned assigner (:class:`detloss.assign.tal.TaskAlignedAssigner`), which
            ranks anchors by ``score^alpha * CIoU^beta`` of the *predictions*. The picture uses
            the untrained head's prior: all logits 0, i.e. every class score 0.5 and a uniform
            distance distribution, whose expected distances are ``(reg_max - 1) / 2`` strides on
            every side (a square of ``reg_max - 1`` strides centred on the anchor point).

Python API (used by the demo): :func:`assignment_table` (one dict per decision) and
:func:`assignment_picture` (a ``PIL.Image``); :func:`read_yolo_labels` reads a YOLO label file
with errors that name the file and line.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..boxes import read_yolo_labels
from .extras import PICTURES, MissingExtraError, require

__all__ = [
    "SCHEMES",
    "assignment_table",
    "assignment_picture",
    "assign_view",
    "read_yolo_labels",
    "format_table",
    "add_arguments",
    "run",
]

SCHEMES = ("yolov3", "yolov5", "fcos", "yolov8")

#: The 9 anchors of yolov3.cfg / yolov5s.yaml (w, h in pixels of the network input).
COCO_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
YOLO_STRIDES = (8, 16, 32)
DARKNET_MASKS = ((0, 1, 2), (3, 4, 5), (6, 7, 8))
FCOS_STRIDES = (8, 16, 32, 64, 128)
DEFAULT_SIZE = (640, 640)
#: The largest network input side drawn or tabulated (a canvas of this size is ~200 MB of RGB).
MAX_SIDE = 8192

PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
)
IGNORED_COLOUR = (128, 128, 128)


# ----------------------------------------------------------------------------- inputs
def _as_rows(rows: Any) -> torch.Tensor:
    """``[N, 5]`` (class, cx, cy, w, h) or ``[N, 6]`` (image, class, cx, cy, w, h) -> ``[N, 6]`` of image 0."""
    t = rows if isinstance(rows, torch.Tensor) else torch.as_tensor(rows, dtype=torch.float64)
    if t.numel() == 0:
        return torch.zeros((0, 6), dtype=torch.float64)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.ndim != 2 or t.shape[1] not in (5, 6):
        raise ValueError(f"rows: expected [N, 5] (class, cx, cy, w, h) or [N, 6] (image, ...), got {tuple(t.shape)}")
    if t.shape[1] == 5:
        t = torch.cat((torch.zeros_like(t[:, :1]), t), 1)
    elif bool((t[:, 0] != 0).any()):
        raise ValueError(f"rows: expected the rows of one image (image index 0), got image indices {sorted(set(t[:, 0].tolist()))}")
    t = t.detach().to(torch.float64)
    bad = ~torch.isfinite(t).all(1) | ((t[:, 2:4] < 0) | (t[:, 2:4] > 1)).any(1) | ((t[:, 4:6] <= 0) | (t[:, 4:6] > 1)).any(1)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(f"rows: expected normalized cx, cy in [0, 1] and w, h in (0, 1], got row {r}: {t[r, 1:].tolist()}")
    cls = t[:, 1]
    if bool(((cls < 0) | (cls != cls.round())).any()):
        r = int(((cls < 0) | (cls != cls.round())).nonzero()[0])
        raise ValueError(f"rows: expected a non-negative integer class, got {float(cls[r])} in row {r}")
    return t


def _size(size: Any, image: Any, name: str = "size") -> Tuple[int, int]:
    if size is None:
        if image is None:
            return DEFAULT_SIZE
        if max(image.height, image.width) > MAX_SIDE:
            raise ValueError(f"image: {image.width} x {image.height} pixels is larger than {MAX_SIDE} per side; "
                             "give a smaller network input size (--size H W)")
        return (image.height, image.width)
    try:
        h, w = (int(v) for v in size)
    except Exception:
        raise ValueError(f"{name}: expected (h, w), got {size!r}") from None
    if not (8 <= h <= MAX_SIDE and 8 <= w <= MAX_SIDE):
        raise ValueError(f"{name}: expected 8 to {MAX_SIDE} pixels per side, got {(h, w)}")
    return h, w


def _check_threshold(name: str, value: Any) -> float:
    """An IoU threshold: a finite number in [0, 1]."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name}: expected a number in [0, 1], got {value!r}") from None
    if not 0.0 <= v <= 1.0:  # also rejects nan
        raise ValueError(f"{name}: expected an IoU threshold in [0, 1], got {value!r}")
    return v


def _open_image(image: Any):
    require(PICTURES, "an assignment picture")
    from PIL import Image, UnidentifiedImageError

    if image is None or isinstance(image, Image.Image):
        return image.convert("RGB") if image is not None else None
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image: no such file: {path}")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image: cannot read {path} as an image ({exc})") from None


# ----------------------------------------------------------------------------- assignment
@dataclass
class Level:
    """One pyramid level: its name, stride and grid, and the pixel size of one cell."""

    name: str
    stride: int
    grid: Tuple[int, int]  # (ny, nx)
    cell: Tuple[float, float]  # (cell_h, cell_w) in pixels of the canvas


@dataclass
class AssignmentView:
    """The decisions of one scheme on one image, ready to draw or tabulate."""

    scheme: str
    size: Tuple[int, int]
    rows: torch.Tensor  # [N, 6]
    boxes: torch.Tensor  # [N, 4] xyxy pixels
    levels: List[Level]
    records: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def _grid(size: Tuple[int, int], stride: int, ceil: bool = True) -> Tuple[int, int]:
    h, w = size
    if ceil:
        return max(1, math.ceil(h / stride)), max(1, math.ceil(w / stride))
    return max(1, h // stride), max(1, w // stride)


def _levels(size: Tuple[int, int], strides: Sequence[int], ceil: bool = True) -> List[Level]:
    out = []
    for s in strides:
        ny, nx = _grid(size, int(s), ceil)
        out.append(Level(f"P{int(round(math.log2(s)))}", int(s), (ny, nx), (size[0] / ny, size[1] / nx)))
    return out


def _rec(level: int, lv: Level, gt: int, cls: int, gy: int, gx: int, status: str, anchor: Optional[int] = None,
         anchor_wh: Optional[Tuple[float, float]] = None, x: Optional[float] = None, y: Optional[float] = None,
         note: str = "") -> Dict[str, Any]:
    ch, cw = lv.cell
    return {
        "gt": gt, "class": cls, "level": level, "level_name": lv.name, "stride": lv.stride,
        "anchor": anchor, "anchor_wh": anchor_wh, "gy": gy, "gx": gx,
        "x": (gx + 0.5) * cw if x is None else x, "y": (gy + 0.5) * ch if y is None else y,
        "status": status, "note": note,
    }


def _view_yolov5(v: AssignmentView, anchors=None, strides=YOLO_STRIDES, anchor_t: float = 4.0) -> None:
    from ..assign.yolov5 import OFFSET_NAMES, assign_yolov5, grid_anchors

    if anchors is None:
        anchors = [sum((COCO_ANCHORS[i] for i in m), ()) for m in DARKNET_MASKS]
    v.levels = _levels(v.size, strides)
    anc = grid_anchors(anchors, strides)
    out = assign_yolov5(v.rows, [lv.grid for lv in v.levels], anc, anchor_t)
    for li, (lv, a) in enumerate(zip(v.levels, out)):
        for k in range(a.num_pos):
            t = int(a.target_index[k])
            ai = int(a.anchor[k])
            wh = tuple(float(u) * lv.stride for u in anc[li][ai])
            v.records.append(_rec(li, lv, t, int(a.classes[k]), int(a.gy[k]), int(a.gx[k]), "positive", ai, wh,
                                  note=OFFSET_NAMES[int(a.offset[k])] + " cell"))
    v.notes.append(f"anchors matched when max(w/a_w, a_w/w, h/a_h, a_h/h) < anchor_t = {anchor_t:g}; "
                   "own cell plus the two nearest neighbour cells")


def _view_yolov3(v: AssignmentView, anchors=COCO_ANCHORS, masks=DARKNET_MASKS, strides=YOLO_STRIDES,
                 ignore_thresh: float = 0.7, truth_thresh: float = 1.0, num_classes: Optional[int] = None) -> None:
    from ..assign.darknet import assign_darknet

    ignore_thresh = _check_threshold("ignore_thresh", ignore_thresh)
    v.levels = _levels(v.size, strides, ceil=False)
    nc = int(num_classes) if num_classes is not None else (int(v.rows[:, 1].max()) + 1 if len(v.rows) else 1)
    # The head's prior: all raw outputs 0 -> each prediction is its anchor centred in its cell.
    inputs = [torch.zeros((1, len(m) * (5 + nc), lv.grid[0], lv.grid[1])) for m, lv in zip(masks, v.levels)]
    out = assign_darknet(inputs, v.rows.float(), anchors, masks, v.size, ignore_thresh, truth_thresh)
    cls = v.rows[:, 1].long()
    anchors_px = [tuple(float(u) for u in a) for a in anchors]
    for li, (lv, a, m) in enumerate(zip(v.levels, out, masks)):
        pos_keys = set()
        for k in range(a.truth.shape[0]):
            t, ai = int(a.truth[k]), int(a.anchor[k])
            gy, gx = int(a.gy[k]), int(a.gx[k])
            pos_keys.add((ai, gy, gx))
            owner = int(a.box_truth[0, ai, gy, gx])
            note = f"best of all anchors: #{int(a.anchor_index[k])}"
            if owner != t:
                note += f"; box target overwritten by gt {owner}"
            v.records.append(_rec(li, lv, t, int(cls[t]), gy, gx, "positive", ai, anchors_px[m[ai]], note=note))
        for ai, gy, gx in a.positive[0].nonzero().tolist():
            if (ai, gy, gx) not in pos_keys:
                t = int(a.box_truth[0, ai, gy, gx])
                v.records.append(_rec(li, lv, t, int(cls[t]), gy, gx, "positive", ai, anchors_px[m[ai]],
                                      note=f"truth_thresh: IoU {float(a.best_iou[0, ai, gy, gx]):.3f}"))
        ign = (a.ignore[0] & ~a.positive[0]).nonzero().tolist()
        for ai, gy, gx in ign:
            t = int(a.best_truth[0, ai, gy, gx])
            v.records.append(_rec(li, lv, t, int(cls[t]), gy, gx, "ignored", ai, anchors_px[m[ai]],
                                  note=f"prior IoU {float(a.best_iou[0, ai, gy, gx]):.3f} > {ignore_thresh:g}"))
    v.notes.append("each truth goes to the best of all 9 anchors by shape IoU, in its centre cell; "
                   f"ignored: prior boxes (zero logits) with IoU > ignore_thresh = {ignore_thresh:g}")


def _view_fcos(v: AssignmentView, strides=FCOS_STRIDES, convention: str = "torchvision",
               center_sampling_radius: Optional[float] = 1.5) -> None:
    from ..assign.fcos import assign_fcos

    v.levels = _levels(v.size, strides)
    targets = [{"boxes": v.boxes, "labels": v.rows[:, 1].long()}]
    a = assign_fcos(targets, [lv.grid for lv in v.levels], strides, convention=convention,
                    center_sampling_radius=center_sampling_radius, image_size=v.size, dtype=torch.float64)
    g = a.grid
    starts = [0]
    for n in g.num_points_per_level[:-1]:
        starts.append(starts[-1] + n)
    cls = v.rows[:, 1].long()
    for p in (a.matched_idxs[0] >= 0).nonzero().flatten().tolist():
        li = int(g.levels[p])
        lv = v.levels[li]
        local = p - starts[li]
        nx = g.feature_sizes[li][1]
        t = int(a.matched_idxs[0, p])
        x, y = (float(u) for u in g.points[p])
        v.records.append(_rec(li, lv, t, int(cls[t]), local // nx, local % nx, "positive", x=x, y=y))
    v.notes.append(f"{convention} convention: point inside the box (centre sampling radius "
                   f"{center_sampling_radius}), max(l, t, r, b) in the level's range, smallest box wins")
    # the points are drawn where the convention puts them
    for lv, (sx, sy), (ox, oy) in zip(v.levels, g.spacing, g.origin):
        lv.cell = (float(sy), float(sx))
        lv.origin = (ox, oy)  # type: ignore[attr-defined]


def _view_yolov8(v: AssignmentView, strides=YOLO_STRIDES, reg_max: int = 16, num_classes: Optional[int] = None,
                 **assigner_kw: Any) -> None:
    from ..assign import tal

    v.levels = _levels(v.size, strides)
    nc = int(num_classes) if num_classes is not None else (int(v.rows[:, 1].max()) + 1 if len(v.rows) else 1)
    pts, strd = [], []
    for lv in v.levels:
        ny, nx = lv.grid
        ys, xs = torch.meshgrid(torch.arange(ny, dtype=torch.float64), torch.arange(nx, dtype=torch.float64), indexing="ij")
        pts.append(torch.stack(((xs.reshape(-1) + 0.5) * lv.stride, (ys.reshape(-1) + 0.5) * lv.stride), -1))
        strd.append(torch.full((ny * nx,), float(lv.stride), dtype=torch.float64))
    anc, stride_t = torch.cat(pts), torch.cat(strd)
    half = (reg_max - 1) / 2 * stride_t[:, None]
    pd_boxes = torch.cat((anc - half, anc + half), -1)[None]
    pd_scores = torch.full((1, anc.shape[0], nc), 0.5, dtype=torch.float64)
    n = v.rows.shape[0]
    gt_labels = v.rows[:, 1].reshape(1, n, 1)
    gt_boxes = v.boxes.reshape(1, n, 4)
    mask_gt = torch.ones((1, n, 1), dtype=torch.bool)
    assigner = tal.TaskAlignedAssigner(**{"num_classes": nc, "strides": tuple(strides), **assigner_kw})
    out = assigner(pd_scores, pd_boxes, anc, gt_labels, gt_boxes, mask_gt, feat_shapes=[lv.grid for lv in v.levels])
    fg, gt_idx = _tal_fg_and_idx(out)
    starts = [0]
    for lv in v.levels[:-1]:
        starts.append(starts[-1] + lv.grid[0] * lv.grid[1])
    cls = v.rows[:, 1].long()
    for p in fg[0].nonzero().flatten().tolist():
        li = max(i for i, s in enumerate(starts) if s <= p)
        lv = v.levels[li]
        local = p - starts[li]
        t = int(gt_idx[0, p])
        v.records.append(_rec(li, lv, t, int(cls[t]), local // lv.grid[1], local % lv.grid[1], "positive",
                              x=float(anc[p, 0]), y=float(anc[p, 1])))
    v.notes.append(f"task-aligned assignment on the untrained head's prior (scores 0.5, boxes {reg_max - 1} "
                   "strides square on each point): top-k anchors inside each box by CIoU^beta")


def _tal_fg_and_idx(out: Any) -> Tuple[torch.Tensor, torch.Tensor]:
    """Read ``fg_mask`` and ``target_gt_idx`` from what the assigner returns (a result object or
    ultralytics' tuple ``(labels, bboxes, scores, fg_mask, target_gt_idx)``)."""
    if hasattr(out, "fg_mask"):
        return out.fg_mask.bool(), out.target_gt_idx.long()
    if isinstance(out, (tuple, list)) and len(out) >= 5:
        return out[3].bool(), out[4].long()
    raise TypeError(f"TaskAlignedAssigner returned {type(out).__name__}; expected fg_mask and target_gt_idx")


_VIEWS = {"yolov3": _view_yolov3, "yolov5": _view_yolov5, "fcos": _view_fcos, "yolov8": _view_yolov8}


def assign_view(scheme: str, rows: Any, size: Optional[Tuple[int, int]] = None, **kw: Any) -> AssignmentView:
    """Run ``scheme``'s assigner on one image's rows and collect its decisions.

    ``rows``: ``[N, 5]`` (class, cx, cy, w, h) or ``[N, 6]`` with image index 0, normalized;
    ``size``: (h, w) of the network input in pixels (default 640 x 640); ``kw``: the scheme's
    options (see the module docstring), e.g. ``anchor_t``, ``ignore_thresh``, ``convention``.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    t = _as_rows(rows)
    size = _size(size, None)
    h, w = size
    from ..boxes import cxcywh_to_xyxy

    boxes = cxcywh_to_xyxy(t[:, 2:6]) * t.new_tensor([w, h, w, h])
    v = AssignmentView(scheme=scheme, size=size, rows=t, boxes=boxes, levels=[])
    _VIEWS[scheme](v, **kw)
    v.records.sort(key=lambda r: (r["gt"], r["level"], r["status"] != "positive", r["gy"], r["gx"],
                                  -1 if r["anchor"] is None else r["anchor"]))
    return v


def assignment_table(scheme: str, rows: Any, size: Optional[Tuple[int, int]] = None, **kw: Any) -> List[Dict[str, Any]]:
    """One dict per decision: ``gt`` (row of ``rows``), ``class``, ``level`` (index), ``level_name``,
    ``stride``, ``anchor`` (index within the level, None for anchor-free schemes), ``anchor_wh``
    (pixels), ``gy``, ``gx`` (cell), ``x``, ``y`` (the cell centre or point, pixels), ``status``
    (``"positive"`` or ``"ignored"``) and ``note`` (why: neighbour cell, IoU, ...).
    Arguments as :func:`assign_view`."""
    return assign_view(scheme, rows, size, **kw).records


# ----------------------------------------------------------------------------- drawing
def _colour(i: int) -> Tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def assignment_picture(scheme: str, rows: Any, image: Any = None, size: Optional[Tuple[int, int]] = None,
                       panel: int = 400, **kw: Any):
    """Draw the assignment: one panel per pyramid level, each with the image (or a blank canvas of
    ``size``), the ground-truth boxes and the cells / anchors / points assigned to each box in that
    box's colour (filled cells, anchor outlines centred on the cell, dots on FCOS / YOLOv8 points);
    ignored YOLOv3 anchors are grey crosses. ``image``: a ``PIL.Image`` or a path; with an image
    and no ``size`` the image's size is the network input. ``panel``: the long side of each panel
    in pixels. Returns a ``PIL.Image.Image``."""
    img = _open_image(image)
    size = _size(size, img)
    return draw_view(assign_view(scheme, rows, size, **kw), img, panel)


def draw_view(v: AssignmentView, img: Any = None, panel: int = 400):
    """Draw an :class:`AssignmentView` (see :func:`assignment_picture`)."""
    require(PICTURES, "an assignment picture")
    from PIL import Image, ImageDraw

    h, w = v.size
    scale = panel / max(h, w)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    base = (img.resize((w, h)) if img is not None and (img.height, img.width) != (h, w) else img)
    if base is None:
        base = Image.new("RGB", (w, h), (236, 236, 236))
    base = base.resize((pw, ph))
    title_h, gap = 16, 6
    canvas = Image.new("RGB", (len(v.levels) * (pw + gap) - gap, ph + title_h), (255, 255, 255))
    for li, lv in enumerate(v.levels):
        layer = base.copy().convert("RGBA")
        over = Image.new("RGBA", layer.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(over)
        ch, cw = lv.cell[0] * scale, lv.cell[1] * scale
        ox, oy = getattr(lv, "origin", (None, None))
        point_mode = v.scheme in ("fcos", "yolov8")
        if min(ch, cw) >= 4 and not point_mode:
            for gx in range(1, lv.grid[1]):
                d.line([(gx * cw, 0), (gx * cw, ph)], fill=(0, 0, 0, 40))
            for gy in range(1, lv.grid[0]):
                d.line([(0, gy * ch), (pw, gy * ch)], fill=(0, 0, 0, 40))
        recs = [r for r in v.records if r["level"] == li]
        for r in recs:
            c = _colour(r["gt"]) if r["status"] == "positive" else IGNORED_COLOUR
            x0, y0 = r["gx"] * cw, r["gy"] * ch
            if point_mode:
                x, y = r["x"] * scale, r["y"] * scale
                rad = max(2.0, min(ch, cw) * 0.3)
                d.ellipse([x - rad, y - rad, x + rad, y + rad], fill=c + (220,), outline=(0, 0, 0, 160))
            elif r["status"] == "positive":
                d.rectangle([x0, y0, x0 + cw, y0 + ch], fill=c + (110,), outline=c + (255,))
            else:
                d.line([(x0, y0), (x0 + cw, y0 + ch)], fill=c + (200,), width=1)
                d.line([(x0 + cw, y0), (x0, y0 + ch)], fill=c + (200,), width=1)
            if r["anchor_wh"] is not None and r["status"] == "positive":
                aw, ah = r["anchor_wh"][0] * scale, r["anchor_wh"][1] * scale
                cx, cy = x0 + cw / 2, y0 + ch / 2
                d.rectangle([cx - aw / 2, cy - ah / 2, cx + aw / 2, cy + ah / 2], outline=c + (150,), width=1)
        for i, b in enumerate(v.boxes.tolist()):
            c = _colour(i)
            x1, y1, x2, y2 = (u * scale for u in b)
            d.rectangle([x1, y1, x2, y2], outline=c + (255,), width=2)
            d.text((x1 + 2, y1 + 1), f"{i}:c{int(v.rows[i, 1])}", fill=c + (255,))
        layer = Image.alpha_composite(layer, over).convert("RGB")
        x_off = li * (pw + gap)
        canvas.paste(layer, (x_off, title_h))
        n_pos = sum(r["status"] == "positive" for r in recs)
        n_ign = sum(r["status"] == "ignored" for r in recs)
        title = f"{v.scheme} {lv.name} s{lv.stride} {lv.grid[1]}x{lv.grid[0]}: {n_pos} pos" + (f", {n_ign} ign" if n_ign else "")
        ImageDraw.Draw(canvas).text((x_off + 2, 2), title, fill=(0, 0, 0))
    return canvas


# ----------------------------------------------------------------------------- tables
def format_table(records: Sequence[Dict[str, Any]], boxes: Optional[torch.Tensor] = None) -> str:
    """The records as an aligned text table (one line per decision) with a per-box summary."""
    head = ("gt", "class", "level", "stride", "anchor", "anchor_wh", "cell (gy,gx)", "centre (x,y)", "status", "note")
    lines = []
    for r in records:
        awh = "-" if r["anchor_wh"] is None else f"{r['anchor_wh'][0]:g}x{r['anchor_wh'][1]:g}"
        lines.append((str(r["gt"]), str(r["class"]), r["level_name"], str(r["stride"]),
                      "-" if r["anchor"] is None else str(r["anchor"]), awh, f"({r['gy']},{r['gx']})",
                      f"({r['x']:.1f},{r['y']:.1f})", r["status"], r["note"]))
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(widths[i]) for i, h in enumerate(head))]
    out.append("  ".join("-" * wd for wd in widths))
    out += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(l)).rstrip() for l in lines]
    if boxes is not None:
        out.append("")
        levels = sorted({(r["level"], r["level_name"]) for r in records})
        for i in range(boxes.shape[0]):
            mine = [r for r in records if r["gt"] == i]
            per = ", ".join(f"{name}: {sum(1 for r in mine if r['level'] == l and r['status'] == 'positive')}"
                            for l, name in levels)
            ign = sum(1 for r in mine if r["status"] == "ignored")
            b = ", ".join(f"{u:.1f}" for u in boxes[i].tolist())
            out.append(f"box {i} [{b}]: {sum(1 for r in mine if r['status'] == 'positive')} positives"
                       + (f" ({per})" if per else "") + (f", {ign} ignored" if ign else ""))
    return "\n".join(out)


# ----------------------------------------------------------------------------- the command
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scheme", choices=SCHEMES, help="assignment scheme")
    parser.add_argument("--image", help="image to draw on (its size is the network input unless --size is given)")
    parser.add_argument("--labels", required=True, help="YOLO label file: one 'class cx cy w h' line per box")
    parser.add_argument("--png", help="write the picture to this PNG file")
    parser.add_argument("--size", nargs=2, type=int, metavar=("H", "W"),
                        help="network input size in pixels (default: the image's size, else 640 640)")
    parser.add_argument("--anchor-t", dest="anchor_t", type=float, help="yolov5: anchor ratio threshold (4.0)")
    parser.add_argument("--ignore-thresh", dest="ignore_thresh", type=float, help="yolov3: ignore threshold (0.7)")
    parser.add_argument("--convention", choices=("torchvision", "mmdet"), help="fcos: matching convention")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def _check_png_path(path: str) -> None:
    if os.path.isdir(path):
        raise ValueError(f"--png: expected the name of a PNG file to write, got the folder {path}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--png: no such folder: {folder}")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"--png: cannot write into the folder {folder}")


def run(args: argparse.Namespace) -> int:
    import json

    kw: Dict[str, Any] = {}
    if args.anchor_t is not None:
        kw["anchor_t"] = args.anchor_t
    if args.ignore_thresh is not None:
        kw["ignore_thresh"] = args.ignore_thresh
    if args.convention is not None:
        kw["convention"] = args.convention
    try:
        for opt, schemes in (("anchor_t", ("yolov5",)), ("ignore_thresh", ("yolov3",)), ("convention", ("fcos",))):
            if opt in kw and args.scheme not in schemes:
                raise ValueError(f"--{opt.replace('_', '-')}: applies to {', '.join(schemes)} only, not {args.scheme}")
        if "ignore_thresh" in kw:
            _check_threshold("--ignore-thresh", kw["ignore_thresh"])
        if "anchor_t" in kw and not (math.isfinite(kw["anchor_t"]) and kw["anchor_t"] > 0):
            raise ValueError(f"--anchor-t: expected a positive ratio threshold, got {kw['anchor_t']}")
        if args.size is not None:
            _size(args.size, None, "--size")
        if args.png:
            _check_png_path(args.png)
        if args.png or args.image:
            require(PICTURES, "detloss assign --png/--image")
        rows = read_yolo_labels(args.labels)
        img = _open_image(args.image) if args.image else None
        size = _size(args.size, img)
        v = assign_view(args.scheme, rows, size, **kw)
        if args.png:
            draw_view(v, img).save(args.png, format="PNG")
    except (ValueError, TypeError, FileNotFoundError, MissingExtraError) as exc:
        print(f"detloss assign: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"scheme": v.scheme, "size": list(v.size), "boxes_xyxy": v.boxes.tolist(),
                          "records": v.records, "notes": v.notes}, indent=2))
    else:
        print(f"{v.scheme} assignment, input {v.size[1]}x{v.size[0]} (w x h), {v.rows.shape[0]} boxes, levels "
              + ", ".join(f"{lv.name}/s{lv.stride} {lv.grid[1]}x{lv.grid[0]}" for lv in v.levels))
        for n in v.notes:
            print(f"  {n}")
        print()
        print(format_table(v.records, v.boxes))
        if args.png:
            print(f"\npicture written to {args.png}")
    return 0
