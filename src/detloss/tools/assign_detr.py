"""``detloss assign detr`` (and ``rtdetr``, ``dfine``, ``deim``, with the focal costs): which query took which box in the Hungarian matching of the
set-prediction losses (DETR, RT-DETR, D-FINE, DEIM), as a table and a picture.

The matching is :class:`detloss.HungarianMatcher`'s on the queries given with ``--predictions``
(a text file, one query per line: ``cx cy w h`` normalized, then optionally its class logits)
or, without it, on the prior of an untrained decoder: ``--queries`` boxes on a regular grid
(side ``1 / k`` for a ``k x k`` grid) with equal class logits, so that only the L1 and GIoU costs
decide. Costs: DETR's training weights (class 1, L1 5, GIoU 2; ``--focal``: RT-DETR's 2, 5, 2
with the focal class cost).

Python API: :func:`detr_matching` (one record per pair, and the view to draw),
:func:`matching_picture` (a ``PIL.Image``), :func:`format_matching`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch

from ..boxes import cxcywh_to_xyxy

__all__ = ["MatchingView", "detr_matching", "grid_queries", "read_queries", "matching_picture", "format_matching"]

DEFAULT_QUERIES = 100


@dataclass
class MatchingView:
    """One image's matching: target boxes and queries (xyxy pixels), the pairs and their costs."""

    size: Tuple[int, int]
    rows: torch.Tensor  # [N, 5] class, cx, cy, w, h (normalized)
    boxes: torch.Tensor  # [N, 4] xyxy pixels
    queries: torch.Tensor  # [Q, 4] xyxy pixels
    records: List[Dict[str, Any]] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


def grid_queries(num_queries: int, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """An untrained decoder's prior: ``num_queries`` boxes on a ``k x k`` grid (``k = ceil(sqrt(Q))``,
    row-major, each ``1 / k`` wide and high) and all-zero class logits ``[Q, num_classes]``."""
    if isinstance(num_queries, bool) or not isinstance(num_queries, int) or num_queries < 1:
        raise ValueError(f"queries: expected an int >= 1, got {num_queries!r}")
    k = math.ceil(math.sqrt(num_queries))
    i = torch.arange(num_queries, dtype=torch.float64)
    cx, cy = (i % k + 0.5) / k, (i // k + 0.5) / k
    side = torch.full_like(cx, 1.0 / k)
    return torch.stack((cx, cy, side, side), -1), torch.zeros((num_queries, num_classes), dtype=torch.float64)


def read_queries(path: str) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A predictions file: one query per line, ``cx cy w h`` (normalized) then optionally its
    class logits (the same number on every line). Returns boxes ``[Q, 4]`` and logits ``[Q, C]``
    (None without logits). Errors name the file and line."""
    import numpy as np

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"predictions: no such file: {path}")
    try:
        rows = np.loadtxt(path, ndmin=2, comments="#", dtype=np.float64)
    except ValueError as exc:  # numpy names the row: "the number of columns changed from 5 to 4 at row 2"
        raise ValueError(f"predictions: {path}: expected one line 'cx cy w h [logits]' per query, the same "
                         f"number of values on every line ({exc})") from None
    if rows.shape[0] == 0 or rows.shape[1] < 4:
        raise ValueError(f"predictions: {path}: expected lines of at least 4 numbers (cx cy w h), got {rows.shape}")
    bad = ~np.isfinite(rows).all(1) | (rows[:, 2] < 0) | (rows[:, 3] < 0)
    if bad.any():
        raise ValueError(f"predictions: {path}: expected finite values with w, h >= 0, got query "
                         f"{int(bad.nonzero()[0][0])}: {rows[bad][0].tolist()}")
    t = torch.tensor(rows, dtype=torch.float64)
    return t[:, :4], (t[:, 4:] if t.shape[1] > 4 else None)


def detr_matching(rows: Any, size: Tuple[int, int] = (640, 640), *, queries: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                  num_queries: int = DEFAULT_QUERIES, num_classes: Optional[int] = None, focal: bool = False) -> MatchingView:
    """Match one image's target ``rows`` ``[N, 5]`` (class, cx, cy, w, h normalized) to ``queries``
    (``(boxes [Q, 4] cxcywh normalized, logits [Q, C] or None)``; default :func:`grid_queries`). One record
    per pair: ``gt``, ``class``, ``query``, ``query_box`` (xyxy pixels), ``cost`` and its terms
    ``c_class``, ``c_bbox``, ``c_giou`` (unweighted), ``iou``."""
    from detloss import HungarianMatcher

    t = torch.as_tensor(rows, dtype=torch.float64).reshape(-1, 5)
    nc = int(num_classes) if num_classes is not None else (int(t[:, 0].max()) + 1 if len(t) else 1)
    if len(t) and int(t[:, 0].max()) >= nc:
        raise ValueError(f"labels: expected classes below {nc}, got {int(t[:, 0].max())}")
    qboxes, qlogits = queries if queries is not None else grid_queries(num_queries, nc)
    if qlogits is None:
        qlogits = torch.zeros((qboxes.shape[0], nc), dtype=torch.float64)
    if not focal and qlogits.shape[1] == nc:  # DETR's softmax needs the no-object logit
        qlogits = torch.cat((qlogits, torch.zeros_like(qlogits[:, :1])), 1)
    if qlogits.shape[1] < nc:
        raise ValueError(f"predictions: expected at least {nc} class logits per query (the labels' classes), "
                         f"got {qlogits.shape[1]}")
    m = HungarianMatcher(2, 5, 2, use_focal=True) if focal else HungarianMatcher(1, 5, 2)
    outputs = {"pred_logits": qlogits[None], "pred_boxes": qboxes[None]}
    targets = [{"labels": t[:, 0].long(), "boxes": t[:, 1:]}]
    (qi, ti), = m(outputs, targets)
    terms = m.cost_terms(outputs, targets)[0]
    h, w = size
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    v = MatchingView(size=(h, w), rows=t, boxes=cxcywh_to_xyxy(t[:, 1:]) * scale, queries=cxcywh_to_xyxy(qboxes) * scale)
    from detloss.functional.detr_terms import paired_box_iou

    for q, j in sorted(zip(qi.tolist(), ti.tolist()), key=lambda p: p[1]):
        iou = float(paired_box_iou(v.queries[q:q + 1], v.boxes[j:j + 1]))
        v.records.append({"gt": j, "class": int(t[j, 0]), "query": q, "query_box": v.queries[q].tolist(),
                          "cost": float(terms["total"][q, j]), "c_class": float(terms["class"][q, j]),
                          "c_bbox": float(terms["bbox"][q, j]), "c_giou": float(terms["giou"][q, j]), "iou": iou})
    what = "the given predictions" if queries is not None else (
        f"{qboxes.shape[0]} grid queries (an untrained decoder's prior: equal class scores, so the L1 and GIoU costs decide)")
    v.notes.append(f"Hungarian matching of {what}; costs " + ("class 2 (focal), L1 5, GIoU 2 (RT-DETR)" if focal
                                                                 else "class 1, L1 5, GIoU 2 (DETR)"))
    unmatched = len(t) - len(v.records)
    if unmatched:
        v.notes.append(f"{unmatched} boxes unmatched: more boxes than queries")
    return v


def format_matching(v: MatchingView) -> str:
    """The pairs as an aligned text table, one line per box."""
    head = ("gt", "class", "query", "query box (x1,y1,x2,y2)", "cost", "c_class", "c_bbox", "c_giou", "IoU")
    lines = [(str(r["gt"]), str(r["class"]), str(r["query"]), "(" + ",".join(f"{u:.1f}" for u in r["query_box"]) + ")",
              f"{r['cost']:.4f}", f"{r['c_class']:.4f}", f"{r['c_bbox']:.4f}", f"{r['c_giou']:.4f}", f"{r['iou']:.3f}")
             for r in v.records]
    widths = [max(len(hd), *(len(l[i]) for l in lines)) if lines else len(hd) for i, hd in enumerate(head)]
    out = ["  ".join(hd.ljust(widths[i]) for i, hd in enumerate(head)), "  ".join("-" * wd for wd in widths)]
    out += ["  ".join(c.ljust(widths[i]) for i, c in enumerate(l)).rstrip() for l in lines]
    if v.records:
        out.append("")
        out.append(f"total cost {sum(r['cost'] for r in v.records):.4f} over {len(v.records)} pairs "
                   f"({v.queries.shape[0] - len(v.records)} queries learn no-object)")
    return "\n".join(out)


def matching_picture(v: MatchingView, img: Any = None, panel: int = 600):
    """The image (or a blank canvas), every query as a faint outline, each target box and the
    query matched to it in the box's colour, joined centre to centre."""
    from PIL import Image, ImageDraw

    from .viz import _colour

    h, w = v.size
    scale = panel / max(h, w)
    pw, ph = max(1, round(w * scale)), max(1, round(h * scale))
    base = img.resize((pw, ph)) if img is not None else Image.new("RGB", (pw, ph), (236, 236, 236))
    layer = base.convert("RGBA")
    over = Image.new("RGBA", layer.size, (0, 0, 0, 0))
    d = ImageDraw.Draw(over)
    for q in v.queries.tolist():
        d.rectangle([u * scale for u in q], outline=(0, 0, 0, 35))
    for r in v.records:
        c = _colour(r["gt"])
        qb = [u * scale for u in r["query_box"]]
        tb = [u * scale for u in v.boxes[r["gt"]].tolist()]
        d.rectangle(qb, outline=c + (200,), width=1)
        d.line([((qb[0] + qb[2]) / 2, (qb[1] + qb[3]) / 2), ((tb[0] + tb[2]) / 2, (tb[1] + tb[3]) / 2)], fill=c + (200,), width=1)
        d.text((qb[0] + 2, qb[1] + 1), f"q{r['query']}", fill=c + (255,))
    for i, b in enumerate(v.boxes.tolist()):
        c = _colour(i)
        x1, y1, x2, y2 = (u * scale for u in b)
        d.rectangle([x1, y1, x2, y2], outline=c + (255,), width=2)
        d.text((x1 + 2, max(0.0, y1 - 11)), f"{i}:c{int(v.rows[i, 0])}", fill=c + (255,))
    out = Image.alpha_composite(layer, over).convert("RGB")
    canvas = Image.new("RGB", (pw, ph + 16), (255, 255, 255))
    canvas.paste(out, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), f"detr: {len(v.records)} of {len(v.rows)} boxes matched, "
                                          f"{v.queries.shape[0]} queries", fill=(0, 0, 0))
    return canvas


def run_detr(args: Any) -> int:
    """``detloss assign detr`` (the options of :func:`detloss.tools.viz.add_arguments`)."""
    import json
    import sys

    from ..boxes import read_yolo_labels
    from .viz import _open_image, _size

    try:
        for opt in ("anchor_t", "ignore_thresh", "convention"):
            if getattr(args, opt, None) is not None:
                raise ValueError(f"--{opt.replace('_', '-')}: does not apply to detr")
        if args.queries is not None and args.predictions:
            raise ValueError("--queries: give either --queries (grid queries) or --predictions, not both")
        rows = read_yolo_labels(args.labels)
        img = _open_image(args.image) if args.image else None
        size = _size(args.size, img)
        queries = read_queries(args.predictions) if args.predictions else None
        focal = args.focal or args.scheme != "detr"  # RT-DETR, D-FINE and DEIM match with the focal cost
        v = detr_matching(rows, size, queries=queries, num_queries=args.queries or DEFAULT_QUERIES, focal=focal)
        if args.png:
            folder = os.path.dirname(os.path.abspath(args.png))
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"png: no such folder: {folder}")
            matching_picture(v, img).save(args.png, format="PNG")
    except (ValueError, TypeError, FileNotFoundError) as exc:
        print(f"detloss assign: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"scheme": "detr", "size": list(v.size), "boxes_xyxy": v.boxes.tolist(),
                          "records": v.records, "notes": v.notes}, indent=2))
    else:
        print(f"detr matching, input {v.size[1]}x{v.size[0]} (w x h), {v.rows.shape[0]} boxes, {v.queries.shape[0]} queries")
        for n in v.notes:
            print(f"  {n}")
        print()
        print(format_matching(v))
        if args.png:
            print(f"\npicture written to {args.png}")
    return 0
