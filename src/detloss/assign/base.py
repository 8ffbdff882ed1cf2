"""The one result type of every assigner: :class:`Assignment`.

An assigner decides, for a batch of ``B`` images with ``A`` predictions each (anchors, points,
anchor x cell slots or queries, flattened in an order the detector loss documents), which
predictions learn which target. Every scheme in :mod:`detloss.assign` returns the same shape of
answer, so a detector loss reads the same way whatever its scheme:

- **positives**, flat: ``batch_index[k]``, ``pred_index[k]`` (``0 .. A-1`` within image
  ``batch_index[k]``) and ``target_index[k]`` for ``k = 0 .. P-1``; per positive its box target
  ``boxes[k]`` (format and units documented by the scheme), class ``labels[k]`` and
  ``weights[k]`` (1 where a scheme has no weights);
- **ignore**: an optional bool ``[B, A]`` mask of predictions that take part in no negative
  (background) term although they are not positives (YOLOv3's ignore threshold, RetinaNet's
  between-threshold band);
- **extras**: what a scheme needs beyond that (darknet's per-layer figures, TAL's dense target
  scores, the Hungarian cost matrices), documented by the scheme.

``target_index`` refers to the targets as the loss received them: the row of ``targets`` for
YOLO rows ``[N, 6]``, the position in the image's ``boxes`` for per-image target lists (the
``matched_idxs`` convention of torchvision, the ``(query, target)`` pairs of DETR).

A prediction may appear in several positives where a scheme says so (YOLOv5 gives one cell to
several targets); :meth:`foreground` is then True once for it. Building an ``Assignment`` never
synchronizes a GPU: only shapes are checked.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["Assignment", "PerLevelAssignment", "BACKGROUND", "IGNORED", "rank_in_group", "cell_index"]

#: ``matched_idxs`` value of a background prediction (torchvision's ``Matcher.BELOW_LOW_THRESHOLD``).
BACKGROUND = -1
#: ``matched_idxs`` value of an ignored prediction (torchvision's ``Matcher.BETWEEN_THRESHOLDS``).
IGNORED = -2


@dataclass
class Assignment:
    """Positives of a batch, flat, plus an ignore mask and scheme-specific extras.

    Attributes:
        batch_index: int64 ``[P]`` image of each positive.
        pred_index: int64 ``[P]`` prediction of each positive within its image, ``0 .. A-1``.
        target_index: int64 ``[P]`` target of each positive (see the module docstring).
        boxes: ``[P, 4]`` box target of each positive (format and units: the scheme's docstring).
        labels: int64 ``[P]`` class of each positive.
        weights: ``[P]`` weight of each positive (ones where the scheme has none).
        batch_size: ``B``.
        num_preds: ``A``, predictions per image.
        ignore: bool ``[B, A]`` predictions excluded from negative terms, or None for none.
        extras: scheme-specific results, named and documented by the scheme.
    """

    batch_index: Tensor
    pred_index: Tensor
    target_index: Tensor
    boxes: Tensor
    labels: Tensor
    weights: Tensor
    batch_size: int
    num_preds: int
    ignore: Optional[Tensor] = None
    extras: Dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        p = self.batch_index.shape[0] if self.batch_index.ndim == 1 else -1
        for name in ("batch_index", "pred_index", "target_index", "labels"):
            t = getattr(self, name)
            if t.ndim != 1 or t.shape[0] != p or t.dtype != torch.int64:
                raise ValueError(f"{name}: expected int64 [{p}] like batch_index, got {t.dtype} {tuple(t.shape)}")
        if self.boxes.ndim != 2 or self.boxes.shape[0] != p:
            raise ValueError(f"boxes: expected [{p}, K] like batch_index, got {tuple(self.boxes.shape)}")
        if self.weights.ndim != 1 or self.weights.shape[0] != p:
            raise ValueError(f"weights: expected [{p}] like batch_index, got {tuple(self.weights.shape)}")
        if self.ignore is not None and tuple(self.ignore.shape) != (self.batch_size, self.num_preds):
            raise ValueError(
                f"ignore: expected bool [{self.batch_size}, {self.num_preds}], got {tuple(self.ignore.shape)}"
            )

    # ------------------------------------------------------------------ sizes
    @property
    def num_pos(self) -> int:
        """Number of positives ``P`` (a shape: no device synchronization)."""
        return int(self.batch_index.shape[0])

    @property
    def device(self) -> torch.device:
        return self.batch_index.device

    @property
    def flat_index(self) -> Tensor:
        """int64 ``[P]``: ``batch_index * A + pred_index``, the positive's row in ``[B * A, ...]``."""
        return self.batch_index * self.num_preds + self.pred_index

    # ------------------------------------------------------------------ dense views
    def foreground(self) -> Tensor:
        """bool ``[B, A]``: predictions that are a positive at least once."""
        fg = torch.zeros(self.batch_size * self.num_preds, dtype=torch.bool, device=self.device)
        fg[self.flat_index] = True
        return fg.view(self.batch_size, self.num_preds)

    def matched_idxs(self) -> List[Tensor]:
        """Per image, int64 ``[A]``: the target index of each prediction, :data:`BACKGROUND` (-1)
        or :data:`IGNORED` (-2), torchvision's ``matched_idxs``. Where a prediction is a positive
        of several targets, the last positive listed wins."""
        m = torch.full((self.batch_size * self.num_preds,), BACKGROUND, dtype=torch.int64, device=self.device)
        if self.ignore is not None:
            m[self.ignore.reshape(-1)] = IGNORED
        m[self.flat_index] = self.target_index
        return list(m.view(self.batch_size, self.num_preds).unbind(0))

    def background(self) -> Tensor:
        """bool ``[B, A]``: neither a positive nor ignored (the predictions of the negative term)."""
        bg = ~self.foreground()
        if self.ignore is not None:
            bg &= ~self.ignore
        return bg

    # ------------------------------------------------------------------ subsets
    def select(self, keep: Tensor) -> "Assignment":
        """The assignment restricted to the positives ``keep`` selects (a bool ``[P]`` mask or an
        index tensor); ignore mask and extras unchanged."""
        return replace(
            self,
            batch_index=self.batch_index[keep],
            pred_index=self.pred_index[keep],
            target_index=self.target_index[keep],
            boxes=self.boxes[keep],
            labels=self.labels[keep],
            weights=self.weights[keep],
        )

    @classmethod
    def empty(
        cls,
        batch_size: int,
        num_preds: int,
        *,
        box_dim: int = 4,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
        ignore: Optional[Tensor] = None,
        extras: Optional[Dict[str, Any]] = None,
    ) -> "Assignment":
        """An assignment without positives."""
        idx = torch.zeros(0, dtype=torch.int64, device=device)
        return cls(
            batch_index=idx,
            pred_index=idx.clone(),
            target_index=idx.clone(),
            boxes=torch.zeros((0, box_dim), dtype=dtype, device=device),
            labels=idx.clone(),
            weights=torch.zeros(0, dtype=dtype, device=device),
            batch_size=batch_size,
            num_preds=num_preds,
            ignore=ignore,
            extras={} if extras is None else extras,
        )


class PerLevelAssignment(Assignment):
    """An :class:`Assignment` of a scheme that decides level by level (YOLOv5, YOLOv3): the flat
    positives of all levels, level after level, and ``extras["levels"]`` the scheme's own
    per-level results, which the object also is a sequence of (``len``, indexing, iteration),
    as the scheme's functions returned them before they returned an ``Assignment``.

    ``pred_index`` follows the head layout ``[A_l, H_l, W_l]`` per level, levels concatenated
    (:func:`cell_index`); ``extras["level"]`` int64 ``[P]`` is each positive's level.
    """

    def __len__(self) -> int:
        return len(self.extras["levels"])

    def __getitem__(self, i: int) -> Any:
        return self.extras["levels"][i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.extras["levels"])


def cell_index(
    shapes: Sequence[Tuple[int, int, int]], level: int, anchor: Tensor, gy: Tensor, gx: Tensor
) -> Tensor:
    """Prediction index of (anchor slot, cell row, cell column) on ``level`` when every level
    ``(num_anchors, ny, nx)`` of ``shapes`` is laid out ``[num_anchors, ny, nx]`` and the levels
    are concatenated: ``offset_l + (anchor * ny + gy) * nx + gx``."""
    offset = sum(na * ny * nx for na, ny, nx in shapes[:level])
    _, ny, nx = shapes[level]
    return offset + (anchor * ny + gy) * nx + gx


def rank_in_group(
    group: Tensor, value: Optional[Tensor] = None, *, descending: bool = True, num_groups: Optional[int] = None
) -> Tensor:
    """Rank of each element among the elements of its group (0 = first), for int64 ``group [n]``.

    With ``value [n]``: ordered by ``value``, largest first (smallest first with
    ``descending=False``); equal values keep their position order. Without ``value``: by
    position, the last element first (``descending=True``) or the first element first. So
    ``rank_in_group(key) == 0`` marks the last occurrence of each key (the last writer of an
    indexed assignment), ``rank_in_group(group, score) == 0`` the best element of each group with
    ties to the earliest, and ``rank_in_group(group, score) < k`` its top ``k``.

    Two stable sorts (one without ``value``); no padding to the largest group, no Python loop.
    ``num_groups``: a bound on ``group`` (``0 <= group < num_groups``), which lets float32 (and
    half-precision) values take one sort of an int64 key (group, order-preserving bits of the
    value) instead of two; the ranks are the same.
    """
    n = group.shape[0]
    idx = torch.arange(n, device=group.device)
    if value is None:
        order = torch.sort(group, stable=True).indices
    elif num_groups is not None and num_groups <= 2**31 and value.dtype in (torch.float32, torch.float16, torch.bfloat16):
        order = torch.sort(group * 2**32 + _ordered_bits(value, descending), stable=True).indices
    else:
        order = torch.sort(value, descending=descending, stable=True).indices
        order = order[torch.sort(group[order], stable=True).indices]
    g = group[order]
    first = torch.ones(n, dtype=torch.bool, device=group.device)
    first[1:] = g[1:] != g[:-1]
    start = torch.cummax(torch.where(first, idx, 0), 0).values
    rank_sorted = idx - start
    if value is None and descending:
        last = torch.ones(n, dtype=torch.bool, device=group.device)
        last[:-1] = first[1:]
        end = torch.flip(torch.cummin(torch.flip(torch.where(last, idx, n), [0]), 0).values, [0])
        rank_sorted = end - idx
    rank = torch.empty_like(rank_sorted)
    rank[order] = rank_sorted
    return rank


def _ordered_bits(value: Tensor, descending: bool) -> Tensor:
    """int64 keys in ``[0, 2**32)`` ordered as the float32 ``value`` (equal values, -0.0 and 0.0
    included, equal keys): the IEEE bits, negative numbers' magnitude bits reversed."""
    bits = (value.to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)  # + 0.0: -0.0 -> 0.0
    key = torch.where(bits >= 0, bits + 2**31, -1 - bits)  # negative: 2**31 - 1 - magnitude bits
    return (2**32 - 1) - key if descending else key
