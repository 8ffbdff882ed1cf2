"""Pictures and tables of target assignment: ``detloss assign SCHEME --image IMG --labels TXT``.

For each scheme the assigner of :mod:`detloss.assign` decides, for the ground-truth boxes of one
image, which cells / anchors / points of each pyramid level are positives (and, for YOLOv3,
which predictions are ignored); this module only draws and tabulates those decisions.

Schemes: the detector losses of the registry (:data:`detloss.losses.registry.LOSSES`). Each
picture builds the loss with its defaults (keywords override them: its constructor's arguments,
e.g. ``anchor_t``, ``ignore_thresh``, ``convention``, ``anchors``, ``strides``, ``reg_max``;
``num_classes`` defaults to the largest class in the rows + 1) and asks it, through its hooks
(:class:`detloss.losses.base.DetectionLoss`), for the outputs of an untrained head on an image of
the picture's size (all logits 0), the assignment it makes on them (``assign``), where each
prediction lies and a note on each positive. All logits 0 means, where the assignment looks at
the predictions: YOLOv3's ignore pass sees every prediction as its anchor centred in its cell
(so "ignored" marks the anchors whose prior box already overlaps a truth by more than the
threshold); YOLOv8's task-aligned assigner sees class scores of 0.5 and a uniform distance
distribution, whose expected distances are ``(reg_max - 1) / 2`` strides on every side.

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

from ..anchors import locate
from ..boxes import cxcywh_to_xyxy, read_yolo_labels
from ..losses.registry import LOSSES
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

SCHEMES = tuple(LOSSES)

#: The 9 anchors of yolov3.cfg / yolov5s.yaml (w, h in pixels of the network input) and the
#: layers' masks, finest level first (the order of the pictures).
COCO_ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
DARKNET_MASKS = ((0, 1, 2), (3, 4, 5), (6, 7, 8))
DEFAULT_SIZE = (640, 640)
#: The largest network input side drawn or tabulated (a canvas of this size is ~200 MB of RGB).
MAX_SIDE = 8192

PALETTE = (
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128),
)
IGNORED_COLOUR = (128, 128, 128)
MINED_COLOUR = (20, 20, 20)
#: An untrained head gives every negative the same loss: which of them are mined is a tie-break.
MINED_NOTE = "hard negative (untrained head: every negative ties)"


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
    points: bool = False  # one prediction per point (anchor-free), drawn as dots


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


def _picture_loss(scheme: str, rows: torch.Tensor, size: Tuple[int, int], kw: Dict[str, Any]):
    """The loss of ``scheme`` with its defaults and ``kw``, for images of ``size``."""
    cls = LOSSES[scheme]
    kw = dict(kw)
    if kw.get("ignore_thresh") is not None:
        kw["ignore_thresh"] = _check_threshold("ignore_thresh", kw["ignore_thresh"])
    nc = kw.pop("num_classes", None)
    nc = int(nc) if nc is not None else (int(rows[:, 1].max()) + 1 if len(rows) else 1) + cls.background_classes
    if cls.image_size_argument is not None:
        kw.setdefault(cls.image_size_argument, size)
    try:
        return cls(nc, **kw)
    except TypeError as exc:
        raise ValueError(f"{scheme}: {exc}") from None


def assign_view(scheme: str, rows: Any, size: Optional[Tuple[int, int]] = None, **kw: Any) -> AssignmentView:
    """Run ``scheme``'s assignment on one image's rows and collect its decisions.

    ``rows``: ``[N, 5]`` (class, cx, cy, w, h) or ``[N, 6]`` with image index 0, normalized;
    ``size``: (h, w) of the network input in pixels (default 640 x 640); ``kw``: the loss's
    constructor arguments (see the module docstring), e.g. ``anchor_t``, ``ignore_thresh``,
    ``convention``. Levels are listed finest first.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    if _set_prediction(scheme):
        raise ValueError(f"scheme: {scheme} matches queries one-to-one, not cells: see "
                         "detloss.tools.assign_detr.detr_matching")
    t = _as_rows(rows)
    size = _size(size, None)
    h, w = size
    boxes = cxcywh_to_xyxy(t[:, 2:6]) * t.new_tensor([w, h, w, h])
    v = AssignmentView(scheme=scheme, size=size, rows=t, boxes=boxes, levels=[])
    loss = _picture_loss(scheme, t, size, kw)
    outputs = loss.prior_outputs(size)
    call = loss.call_kwargs(size)
    asg = loss.assign(*outputs, loss.targets_from_rows(t, 1, size), **call)
    grids = loss.prediction_levels(*outputs, **call)
    order = sorted(range(len(grids)), key=lambda i: grids[i].stride)  # finest level first
    shown = {li: k for k, li in enumerate(order)}
    for li in order:
        g = grids[li]
        name = f"P{int(round(math.log2(g.stride)))}"
        v.levels.append(Level(name, int(g.stride), g.grid, (g.spacing[1], g.spacing[0]), points=g.anchors is None))
    cls = t[:, 1].long().tolist()

    def records(pred_index, targets, status, notes):
        at = {k: u.tolist() for k, u in locate(grids, pred_index).items()}
        for k, gt in enumerate(targets):
            li = at["level"][k]
            g = grids[li]
            anchor = None if g.anchors is None else at["anchor"][k]
            wh = None if anchor is None else tuple(float(u) for u in g.anchors[anchor])
            v.records.append(_rec(shown[li], v.levels[shown[li]], gt, cls[gt] if gt >= 0 else -1, at["gy"][k], at["gx"][k],
                                  status, anchor, wh, x=at["x"][k], y=at["y"][k], note=notes[k]))

    records(asg.pred_index, asg.target_index.tolist(), "positive", loss.assignment_notes(asg))
    if asg.ignore is not None:
        ignored = asg.ignore[0].nonzero().flatten()
        owner = asg.extras.get("ignore_target")
        gts = owner[0, ignored].tolist() if owner is not None else [-1] * len(ignored)
        records(ignored, gts, "ignored", ["in no background term"] * len(ignored))
    mined = asg.extras.get("mined")
    if mined is not None:  # SSD's hard negatives (with an untrained head every negative ties)
        picked = mined[0].nonzero().flatten()
        records(picked, [-1] * len(picked), "mined", [MINED_NOTE] * len(picked))
    v.notes.append((type(loss).__doc__ or scheme).strip().splitlines()[0])
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
        point_mode = lv.points
        if min(ch, cw) >= 4 and not point_mode:
            for gx in range(1, lv.grid[1]):
                d.line([(gx * cw, 0), (gx * cw, ph)], fill=(0, 0, 0, 40))
            for gy in range(1, lv.grid[0]):
                d.line([(0, gy * ch), (pw, gy * ch)], fill=(0, 0, 0, 40))
        recs = [r for r in v.records if r["level"] == li]
        for r in recs:
            c = _colour(r["gt"]) if r["status"] == "positive" else MINED_COLOUR if r["status"] == "mined" else IGNORED_COLOUR
            x0, y0 = r["x"] * scale - cw / 2, r["y"] * scale - ch / 2  # the cell around the prediction's point
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
                cx, cy = r["x"] * scale, r["y"] * scale  # the anchor's centre
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
        n_mined = sum(r["status"] == "mined" for r in recs)
        title = (f"{v.scheme} {lv.name} s{lv.stride} {lv.grid[1]}x{lv.grid[0]}: {n_pos} pos" + (f", {n_ign} ign" if n_ign else "")
                 + (f", {n_mined} mined" if n_mined else ""))
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
    parser.add_argument("--queries", type=int, help="set-prediction losses: grid queries of an untrained decoder (100)")
    parser.add_argument("--predictions", help="set-prediction losses: queries file, one 'cx cy w h [logits]' line per query")
    parser.add_argument("--focal", action="store_true", help="detr: RT-DETR's focal matching costs (2, 5, 2)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")


def _set_prediction(scheme: str) -> bool:
    """The DETR family matches queries one-to-one instead of assigning cells (tools.assign_detr)."""
    from ..losses.detr import SetCriterion

    return issubclass(LOSSES[scheme], SetCriterion)


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

    if _set_prediction(args.scheme):
        from .assign_detr import run_detr

        return run_detr(args)
    for opt in ("queries", "predictions", "focal"):
        if getattr(args, opt, None):
            print(f"detloss assign: error: --{opt}: applies to the set-prediction losses (detr, rtdetr, dfine, deim) "
                  f"only, not {args.scheme}", file=sys.stderr)
            return 2

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
