"""Box conversions and target-format converters shared by the assigners, losses and tools.

Formats: ``"xyxy"`` (x1, y1, x2, y2), ``"cxcywh"`` (centre, width, height). YOLO target rows
are ``[N, 6]``: (image_index, class, cx, cy, w, h) normalized to 0..1; torchvision-style
targets are a list (one per image) of ``{"boxes": [n, 4] xyxy pixels, "labels": [n] int64}``.
"""
from __future__ import annotations

import math
import os
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from ._checks import check_choice, check_tensor, compute_dtype, upcast

BOX_FORMATS = ("xyxy", "cxcywh")


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) -> (x1, y1, x2, y2), over the last dimension."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), dim=-1)


def xyxy_to_cxcywh(boxes: torch.Tensor) -> torch.Tensor:
    """(x1, y1, x2, y2) -> (cx, cy, w, h), over the last dimension."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1), dim=-1)


def box_convert(boxes: torch.Tensor, in_fmt: str, out_fmt: str) -> torch.Tensor:
    """Convert boxes between ``"xyxy"`` and ``"cxcywh"``."""
    check_choice("in_fmt", in_fmt, BOX_FORMATS)
    check_choice("out_fmt", out_fmt, BOX_FORMATS)
    if in_fmt == out_fmt:
        return boxes
    return cxcywh_to_xyxy(boxes) if in_fmt == "cxcywh" else xyxy_to_cxcywh(boxes)


def yolo_rows_to_targets(
    rows: torch.Tensor, batch_size: int, image_size: Tuple[int, int]
) -> List[Dict[str, torch.Tensor]]:
    """YOLO rows ``[N, 6]`` (image_index, class, cx, cy, w, h; normalized) -> a list of
    ``batch_size`` dicts ``{"boxes": xyxy pixels, "labels": int64}``; ``image_size`` is (h, w).

    The pixels are computed in float32 or wider (float64 rows in float64): float16 rows would
    round a 1024-pixel coordinate to half a pixel."""
    check_tensor("rows", rows)
    if rows.ndim != 2 or rows.shape[-1] != 6:
        raise ValueError(f"rows: expected shape [N, 6], got {tuple(rows.shape)}")
    rows = upcast(rows, compute_dtype(rows))
    h, w = image_size
    scale = rows.new_tensor([w, h, w, h])
    out = []
    img = rows[:, 0].long()
    for b in range(batch_size):
        r = rows[img == b]
        out.append({"boxes": cxcywh_to_xyxy(r[:, 2:6]) * scale, "labels": r[:, 1].long()})
    return out


def targets_to_yolo_rows(targets: Sequence[Dict[str, torch.Tensor]], image_size: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`yolo_rows_to_targets`: list of ``{"boxes", "labels"}`` -> rows ``[N, 6]``."""
    h, w = image_size
    rows = []
    for b, t in enumerate(targets):
        boxes = t["boxes"]
        scale = boxes.new_tensor([w, h, w, h])
        cxcywh = xyxy_to_cxcywh(boxes) / scale
        idx = torch.full((boxes.shape[0], 1), float(b), dtype=boxes.dtype, device=boxes.device)
        rows.append(torch.cat((idx, t["labels"].to(boxes.dtype)[:, None], cxcywh), dim=1))
    if not rows:
        return torch.zeros((0, 6))
    return torch.cat(rows, dim=0)


def image_counts(image_index: torch.Tensor, batch_size: int) -> torch.Tensor:
    """int64 ``[batch_size]``: the rows of each image (``image_index`` int64 ``[N]`` in range),
    counted by an index_add (``torch.bincount`` synchronizes on accelerators to size its output)."""
    return torch.zeros(batch_size, dtype=torch.long, device=image_index.device).index_add_(
        0, image_index, torch.ones_like(image_index)
    )


def image_slots(image_index: torch.Tensor, batch_size: int, most: Optional[int] = None) -> Tuple[torch.Tensor, int]:
    """Rows of several images into one padded ``[batch_size, M]`` table: the slot of each row
    within its image (rows keep their order within an image; they need not be sorted by image)
    and ``M``, the most rows of one image (0 without rows). ``image_index``: int64 ``[N]``.
    ``most``: ``M`` when the caller has read it already (else one host synchronization here)."""
    counts = image_counts(image_index, batch_size)
    m = most if most is not None else (int(counts.max()) if image_index.numel() else 0)
    order = torch.sort(image_index, stable=True).indices
    slot = torch.empty_like(image_index)
    slot[order] = torch.arange(image_index.numel(), device=image_index.device) - (torch.cumsum(counts, 0) - counts)[image_index[order]]
    return slot, m


def _bad_rows(mask: torch.Tensor, limit: int = 5) -> str:
    rows = mask.nonzero().flatten()[:limit].tolist()
    return ", ".join(str(r) for r in rows)


def yolo_target_rows(targets: object, name: str = "targets") -> torch.Tensor:
    """The checks of :func:`check_yolo_targets` that need no values: a floating-point ``[N, 6]``
    tensor, returned as it is."""
    t = check_tensor(name, targets)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor of rows (image, class, cx, cy, w, h), got dtype {t.dtype}")
    if t.ndim != 2 or t.shape[1] != 6:
        raise ValueError(f"{name}: expected shape [N, 6] (image, class, cx, cy, w, h), got {tuple(t.shape)}")
    return t


def yolo_target_flags(t: torch.Tensor, num_classes: Optional[int], batch_size: Optional[int]) -> torch.Tensor:
    """bool ``[4]``: whether some row of the ``[N, 6]`` rows ``t`` fails each value check of
    :func:`check_yolo_targets`, without synchronizing (a caller may read them together with other
    checks in one synchronization, then call :func:`check_yolo_targets` for the error)."""
    idx_cls = t[:, :2]
    bounds = t.new_tensor([math.inf if batch_size is None else batch_size, math.inf if num_classes is None else num_classes])
    xywh = t[:, 2:6]
    return torch.stack((
        ~torch.isfinite(t).all(),
        ((idx_cls < 0) | (idx_cls != idx_cls.floor())).any(),
        (idx_cls >= bounds).any(),
        ((xywh < 0) | (xywh > 1)).any(),
    ))


def check_yolo_targets(
    targets: object, num_classes: Optional[int] = None, batch_size: Optional[int] = None, name: str = "targets"
) -> torch.Tensor:
    """Validate YOLO target rows ``[N, 6]`` (image_index, class, cx, cy, w, h), normalized.

    Raises TypeError/ValueError naming ``name``, the expectation and the offending rows: NaN or
    inf, negative or non-integer image index or class, class >= ``num_classes``, image index
    >= ``batch_size``, coordinates outside [0, 1].
    """
    t = yolo_target_rows(targets, name)
    if t.shape[0] == 0:
        return t
    if not bool(yolo_target_flags(t, num_classes, batch_size).any()):  # one synchronization for every check
        return t
    bad = ~torch.isfinite(t).all(1)
    if bool(bad.any()):
        raise ValueError(f"{name}: expected finite values, got NaN or inf in row(s) {_bad_rows(bad)}")
    for col, what, limit in ((0, "image index", batch_size), (1, "class", num_classes)):
        v = t[:, col]
        bad = (v < 0) | (v != v.floor())
        if bool(bad.any()):
            r = int(bad.nonzero()[0])
            raise ValueError(
                f"{name}: expected a non-negative integer {what} in column {col}, got {float(v[r])} in row {r}"
            )
        if limit is not None:
            bad = v >= limit
            if bool(bad.any()):
                r = int(bad.nonzero()[0])
                bound = "num_classes" if col == 1 else "the batch size (the predictions' first dimension)"
                raise ValueError(
                    f"{name}: expected {what} < {bound} = {limit}, got {int(v[r])} in row {r}"
                    + (f" (rows {_bad_rows(bad)})" if int(bad.sum()) > 1 else "")
                )
    xywh = t[:, 2:6]
    bad = ((xywh < 0) | (xywh > 1)).any(1)
    if bool(bad.any()):
        r = int(bad.nonzero()[0])
        raise ValueError(
            f"{name}: expected normalized coordinates cx, cy, w, h in [0, 1], got {t[r, 2:6].tolist()} in row {r}"
            + (f" (rows {_bad_rows(bad)})" if int(bad.sum()) > 1 else "")
        )
    return t


def read_yolo_labels(path: Union[str, os.PathLike], num_classes: Optional[int] = None) -> torch.Tensor:
    """Read a YOLO label file: one ``class cx cy w h`` line per box (normalized 0..1) -> ``[N, 5]`` float64.

    Blank lines and ``#`` comments are skipped. Errors name the file and the line: a missing file
    (FileNotFoundError), a line that is not five numbers, a value that is not finite, a class
    that is not a non-negative integer (below ``num_classes`` if given), a centre outside [0, 1],
    or a width/height outside (0, 1].
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"labels: no such file: {path}")
    rows: List[List[float]] = []
    with open(path, "r", encoding="utf-8", errors="replace") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            where = f"{path}:{lineno}"
            if len(parts) != 5:
                raise ValueError(f"{where}: expected 5 values 'class cx cy w h', got {len(parts)}: {raw.strip()!r}")
            try:
                vals = [float(v) for v in parts]
            except ValueError:
                raise ValueError(f"{where}: expected numbers 'class cx cy w h', got {raw.strip()!r}") from None
            if not all(math.isfinite(v) for v in vals):
                raise ValueError(f"{where}: expected finite numbers, got {raw.strip()!r}")
            c, cx, cy, w, h = vals
            if c < 0 or c != int(c) or (num_classes is not None and c >= num_classes):
                limit = f" below {num_classes}" if num_classes is not None else ""
                raise ValueError(f"{where}: expected a non-negative integer class{limit}, got {parts[0]!r}")
            if not (0 <= cx <= 1 and 0 <= cy <= 1):
                raise ValueError(
                    f"{where}: expected a centre cx, cy normalized to 0..1, i.e. in [0, 1], got {cx:g}, {cy:g}"
                )
            if not (0 < w <= 1 and 0 < h <= 1):
                raise ValueError(
                    f"{where}: expected a positive width and height normalized to 0..1, i.e. w, h in (0, 1], "
                    f"got {w:g}, {h:g}"
                )
            rows.append(vals)
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 5)
