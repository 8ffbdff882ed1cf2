r"""Anchors of torchvision's anchor-based detectors, for given feature sizes and image size.

:class:`AnchorGenerator` is torchvision 0.29 ``models/detection/anchor_utils.py``
``AnchorGenerator`` (RetinaNet, Faster R-CNN, FCOS) and :class:`DefaultBoxGenerator` its
``DefaultBoxGenerator`` (SSD, SSDlite; Liu et al. 2016, "SSD: Single Shot MultiBox Detector",
arXiv:1512.02325, section 2.2), the same numbers in the same layout: per level, per location in
row-major order (y outer, x inner), per cell anchor. Instead of an ``ImageList`` and the feature
maps they take the ``(h, w)`` of every feature map and the ``(H, W)`` of the (padded) batch, and
return one ``[A, 4]`` xyxy pixel tensor, the anchors of every image.

AnchorGenerator: per level, cell anchors ``round([-w, -h, w, h] / 2)`` with
``w = size / sqrt(r)``, ``h = size * sqrt(r)`` for each aspect ratio ``r = h / w`` (outer) and
size (inner), computed in float32 (``round`` is half-to-even); placed at
``(x s_w, y s_h)`` with the spacing ``(s_h, s_w) = (H // h, W // w)``, no half-cell offset.

DefaultBoxGenerator: scales ``s_k = s_min + (s_max - s_min) k / (L - 1)`` then 1.0 appended (when
not given); per level the relative sizes ``(s_k, s_k)``, ``(s'_k, s'_k)`` with
``s'_k = sqrt(s_k s_{k+1})`` and ``(s_k sqrt(r), s_k / sqrt(r))`` and its transpose for each
aspect ratio, clamped to [0, 1] when ``clip``; centres ``((j + 0.5) / f_x, (i + 0.5) / f_y)`` with
``f = image / step`` (the feature size when ``steps`` is None), in float32; then
``(c - wh / 2, c + wh / 2) * (W, H)`` in the requested dtype.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._checks import as_pair
from .anchors import GridLevel
from .assign.fcos import check_feature_sizes

__all__ = [
    "AnchorGenerator",
    "DefaultBoxGenerator",
    "RETINANET_ANCHOR_SIZES",
    "RETINANET_ASPECT_RATIOS",
    "feature_sizes_for",
]

#: RetinaNet's default sizes on P3-P7: ``(x, int(x * 2^(1/3)), int(x * 2^(2/3)))`` for x = 32..512.
RETINANET_ANCHOR_SIZES: Tuple[Tuple[int, ...], ...] = tuple(
    (x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512)
)
#: RetinaNet's default aspect ratios (h / w) on every level.
RETINANET_ASPECT_RATIOS: Tuple[Tuple[float, ...], ...] = ((0.5, 1.0, 2.0),) * 5


def feature_sizes_for(image_size: Tuple[int, int], strides: Sequence[float]) -> List[Tuple[int, int]]:
    """``(ceil(H / s), ceil(W / s))`` per stride: the feature sizes of a backbone of those strides
    on a padded input of ``image_size`` (ResNet-FPN's P3-P7, SSD300's 38..1 for 300 px)."""
    h, w = _check_image_size(image_size)
    return [(math.ceil(h / s), math.ceil(w / s)) for s in strides]


def _check_image_size(image_size: object) -> Tuple[int, int]:
    h, w = as_pair("image_size", image_size)
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size: expected a positive (h, w), got {(h, w)}")
    return h, w


def _row_major(h: int, w: int, sx: Tensor, sy: Tensor) -> Tuple[Tensor, Tensor]:
    """x and y offsets of an ``h x w`` grid in row-major order, ``x * sx``, ``y * sy``."""
    ys, xs = torch.meshgrid(sy, sx, indexing="ij")
    return xs.reshape(-1), ys.reshape(-1)


class AnchorGenerator:
    """torchvision's ``AnchorGenerator`` for given feature sizes (see the module docstring).

    Args:
        sizes: per level, the anchor sizes (sqrt of the area) in pixels; default RetinaNet's.
        aspect_ratios: per level, the ratios ``h / w``; default (0.5, 1, 2) on every level.

    ``generator(feature_sizes, image_size)`` -> ``[A, 4]`` xyxy pixels,
    ``A = sum_l h_l w_l len(sizes[l]) len(aspect_ratios[l])``.
    """

    def __init__(
        self,
        sizes: Sequence[Sequence[float]] = RETINANET_ANCHOR_SIZES,
        aspect_ratios: Sequence[Sequence[float]] = RETINANET_ASPECT_RATIOS,
    ) -> None:
        self.sizes = tuple(tuple(float(s) for s in level) for level in sizes)
        self.aspect_ratios = tuple(tuple(float(r) for r in level) for level in aspect_ratios)
        if len(self.sizes) != len(self.aspect_ratios):
            raise ValueError(
                f"aspect_ratios: expected {len(self.sizes)} levels like sizes, got {len(self.aspect_ratios)}"
            )
        for name, levels in (("sizes", self.sizes), ("aspect_ratios", self.aspect_ratios)):
            if not levels or any(not lv or min(lv) <= 0 or not all(map(math.isfinite, lv)) for lv in levels):
                raise ValueError(f"{name}: expected non-empty levels of finite positive numbers, got {levels}")
        self.cell_anchors = [self._cell_anchors(s, r) for s, r in zip(self.sizes, self.aspect_ratios)]

    @staticmethod
    def _cell_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> Tensor:
        """Zero-centred anchors of one level ``[len(ratios) * len(sizes), 4]``, float32, ratio-major."""
        scales = torch.tensor(sizes, dtype=torch.float32)
        h_ratios = torch.sqrt(torch.tensor(aspect_ratios, dtype=torch.float32))
        w_ratios = 1 / h_ratios
        ws = (w_ratios[:, None] * scales[None, :]).reshape(-1)
        hs = (h_ratios[:, None] * scales[None, :]).reshape(-1)
        return (torch.stack((-ws, -hs, ws, hs), dim=1) / 2).round()

    def num_anchors_per_location(self) -> List[int]:
        return [len(s) * len(r) for s, r in zip(self.sizes, self.aspect_ratios)]

    def num_anchors_per_level(self, feature_sizes: Sequence[Tuple[int, int]]) -> List[int]:
        sizes = check_feature_sizes(feature_sizes, len(self.sizes))
        return [h * w * k for (h, w), k in zip(sizes, self.num_anchors_per_location())]

    def strides(self, feature_sizes: Sequence[Tuple[int, int]], image_size: Tuple[int, int]) -> List[Tuple[int, int]]:
        """Anchor spacing ``(H // h, W // w)`` per level, as torchvision computes it."""
        sizes = check_feature_sizes(feature_sizes, len(self.sizes))
        img_h, img_w = _check_image_size(image_size)
        return [(img_h // h, img_w // w) for h, w in sizes]

    def __call__(
        self,
        feature_sizes: Sequence[Tuple[int, int]],
        image_size: Tuple[int, int],
        *,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> Tensor:
        sizes = check_feature_sizes(feature_sizes, len(self.sizes))
        out = []
        for (h, w), (sy, sx), cell in zip(sizes, self.strides(sizes, image_size), self.cell_anchors):
            xs, ys = _row_major(
                h, w,
                torch.arange(w, dtype=torch.int64, device=device) * sx,
                torch.arange(h, dtype=torch.int64, device=device) * sy,
            )
            shifts = torch.stack((xs, ys, xs, ys), dim=1).to(dtype)
            out.append((shifts[:, None, :] + cell.to(dtype=dtype, device=device)[None]).reshape(-1, 4))
        return torch.cat(out)

    def grid_levels(
        self, feature_sizes: Sequence[Tuple[int, int]], image_size: Tuple[int, int], strides: Sequence[float]
    ) -> List[GridLevel]:
        """Where the anchors lie (:class:`~detloss.anchors.GridLevel` per level, for the tools):
        cells at the anchors' spacing, points at the cells' corners, the cell anchors' sizes."""
        sizes = check_feature_sizes(feature_sizes, len(self.sizes))
        out = []
        for (h, w), (sy, sx), cell, s in zip(sizes, self.strides(sizes, image_size), self.cell_anchors, strides):
            wh = [(float(x2 - x1), float(y2 - y1)) for x1, y1, x2, y2 in cell.tolist()]
            out.append(GridLevel(float(s), (h, w), (float(sx), float(sy)), offset=0.0, anchors=wh, slot_last=True))
        return out

    def __repr__(self) -> str:
        return f"AnchorGenerator(sizes={self.sizes}, aspect_ratios={self.aspect_ratios})"


class DefaultBoxGenerator:
    """torchvision's ``DefaultBoxGenerator`` (SSD) for given feature sizes (module docstring).

    Args:
        aspect_ratios: per level, the extra aspect ratios (each adds two boxes).
        min_ratio, max_ratio: ``s_min``, ``s_max`` of the scales when ``scales`` is None
            (torchvision's defaults 0.15, 0.9).
        scales: ``L + 1`` relative scales (overrides min_ratio / max_ratio).
        steps: per level, the step in pixels setting the centres' spacing (default: the feature
            size).
        clip: clamp the relative sizes to [0, 1] (default True, as torchvision).

    ``generator(feature_sizes, image_size)`` -> ``[A, 4]`` xyxy pixels.
    :meth:`ssd300` and :meth:`ssdlite320` are torchvision's ``ssd300_vgg16`` and
    ``ssdlite320_mobilenet_v3_large`` configurations.
    """

    def __init__(
        self,
        aspect_ratios: Sequence[Sequence[float]],
        min_ratio: float = 0.15,
        max_ratio: float = 0.9,
        scales: Optional[Sequence[float]] = None,
        steps: Optional[Sequence[float]] = None,
        clip: bool = True,
    ) -> None:
        self.aspect_ratios = tuple(tuple(float(r) for r in level) for level in aspect_ratios)
        n = len(self.aspect_ratios)
        if n == 0 or any(r <= 0 or not math.isfinite(r) for level in self.aspect_ratios for r in level):
            raise ValueError(f"aspect_ratios: expected levels of finite positive ratios, got {self.aspect_ratios}")
        if steps is not None and len(steps) != n:
            raise ValueError(f"steps: expected {n} values (one per level), got {len(steps)}")
        self.steps = None if steps is None else tuple(float(s) for s in steps)
        if self.steps is not None and min(self.steps) <= 0:
            raise ValueError(f"steps: expected positive numbers, got {self.steps}")
        self.clip = bool(clip)
        if scales is None:
            if n > 1:
                span = max_ratio - min_ratio
                self.scales = tuple(min_ratio + span * k / (n - 1.0) for k in range(n)) + (1.0,)
            else:
                self.scales = (float(min_ratio), float(max_ratio))
        else:
            self.scales = tuple(float(s) for s in scales)
        if len(self.scales) != n + 1:
            raise ValueError(f"scales: expected {n + 1} values (one per level and one more), got {len(self.scales)}")
        if min(self.scales) < 0:
            raise ValueError(f"scales: expected non-negative numbers, got {self.scales}")
        self.wh_pairs = [self._wh_pairs(k) for k in range(n)]

    @classmethod
    def ssd300(cls) -> "DefaultBoxGenerator":
        """torchvision's ``ssd300_vgg16`` default boxes (8732 for its 38..1 feature maps)."""
        return cls(
            [[2], [2, 3], [2, 3], [2, 3], [2], [2]],
            scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
            steps=[8, 16, 32, 64, 100, 300],
        )

    @classmethod
    def ssdlite320(cls) -> "DefaultBoxGenerator":
        """torchvision's ``ssdlite320_mobilenet_v3_large`` default boxes."""
        return cls([[2, 3]] * 6, min_ratio=0.2, max_ratio=0.95)

    def _wh_pairs(self, k: int) -> Tensor:
        """Relative ``(w, h)`` of one level's boxes ``[2 + 2 n_k, 2]``, float32 (unclipped)."""
        s_k = self.scales[k]
        s_prime = math.sqrt(self.scales[k] * self.scales[k + 1])
        pairs = [[s_k, s_k], [s_prime, s_prime]]
        for ar in self.aspect_ratios[k]:
            sq = math.sqrt(ar)
            pairs.extend([[s_k * sq, s_k / sq], [s_k / sq, s_k * sq]])
        return torch.tensor(pairs, dtype=torch.float32)

    def num_anchors_per_location(self) -> List[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def num_anchors_per_level(self, feature_sizes: Sequence[Tuple[int, int]]) -> List[int]:
        sizes = check_feature_sizes(feature_sizes, len(self.aspect_ratios))
        return [h * w * k for (h, w), k in zip(sizes, self.num_anchors_per_location())]

    def default_boxes_cxcywh(
        self, feature_sizes: Sequence[Tuple[int, int]], image_size: Tuple[int, int], *, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """Relative ``(cx, cy, w, h)`` of every default box ``[A, 4]`` (computed in float32)."""
        sizes = check_feature_sizes(feature_sizes, len(self.aspect_ratios))
        img_h, img_w = _check_image_size(image_size)
        out = []
        for k, (h, w) in enumerate(sizes):
            f_x, f_y = (w, h) if self.steps is None else (img_w / self.steps[k], img_h / self.steps[k])
            xs, ys = _row_major(
                h, w,
                (torch.arange(w, dtype=torch.float32) + 0.5) / f_x,
                (torch.arange(h, dtype=torch.float32) + 0.5) / f_y,
            )
            wh = self.wh_pairs[k].clamp(min=0, max=1) if self.clip else self.wh_pairs[k]
            n = wh.shape[0]
            centres = torch.stack((xs, ys), dim=1).repeat_interleave(n, dim=0).to(dtype)
            out.append(torch.cat((centres, wh.repeat(h * w, 1).to(dtype)), dim=1))
        return torch.cat(out)

    def __call__(
        self,
        feature_sizes: Sequence[Tuple[int, int]],
        image_size: Tuple[int, int],
        *,
        dtype: torch.dtype = torch.float32,
        device: Optional[torch.device] = None,
    ) -> Tensor:
        img_h, img_w = _check_image_size(image_size)
        boxes = self.default_boxes_cxcywh(feature_sizes, image_size, dtype=dtype).to(device)
        scale = torch.tensor([img_w, img_h], device=boxes.device)
        c, wh = boxes[:, :2], boxes[:, 2:]
        return torch.cat(((c - 0.5 * wh) * scale, (c + 0.5 * wh) * scale), dim=1)

    def grid_levels(
        self, feature_sizes: Sequence[Tuple[int, int]], image_size: Tuple[int, int], strides: Sequence[float]
    ) -> List[GridLevel]:
        """Where the default boxes lie (:class:`~detloss.anchors.GridLevel` per level, for the
        tools): cells of ``image / f`` pixels, points at their centres, the boxes' sizes in pixels."""
        sizes = check_feature_sizes(feature_sizes, len(self.aspect_ratios))
        img_h, img_w = _check_image_size(image_size)
        out = []
        for k, ((h, w), s) in enumerate(zip(sizes, strides)):
            f_x, f_y = (w, h) if self.steps is None else (img_w / self.steps[k], img_h / self.steps[k])
            wh = self.wh_pairs[k].clamp(min=0, max=1) if self.clip else self.wh_pairs[k]
            slots = [(bw * img_w, bh * img_h) for bw, bh in wh.double().tolist()]
            out.append(GridLevel(float(s), (h, w), (img_w / f_x, img_h / f_y), offset=0.5, anchors=slots, slot_last=True))
        return out

    def __repr__(self) -> str:
        return (
            f"DefaultBoxGenerator(aspect_ratios={self.aspect_ratios}, clip={self.clip}, "
            f"scales={self.scales}, steps={self.steps})"
        )
