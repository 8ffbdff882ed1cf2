"""Compact CNN detectors for the demo: one backbone + FPN neck, one head per loss.

The backbone is a small strided CNN (conv, batch norm, SiLU, residual blocks) giving feature
maps at strides 8, 16 and 32; a top-down FPN merges them. Each head produces exactly what its
loss takes:

- ``yolov5``: per level ``[B, na, H, W, 5 + C]`` (anchors; box, objectness, classes).
- ``yolov3``: per layer ``[B, na * (5 + C), H, W]`` in darknet's channel layout (anchor slot
  ``a``, entry ``e`` at channel ``a * (5 + C) + e``), layers ordered by the loss's strides (32, 16, 8).
- ``fcos``: ``cls_logits [B, sum HW, C]``, ``bbox_regression [B, sum HW, 4]`` (non-negative),
  ``centerness [B, sum HW, 1]`` and the feature sizes, from towers shared across levels.
- ``yolov8``: per level ``[B, 4 * reg_max + C, H, W]`` (DFL box distributions, then classes).
- ``retinanet``: ``cls_logits [B, A, C]``, ``bbox_regression [B, A, 4]`` (anchor codes) in
  torchvision's layout (per level, per location, per anchor) and the anchors ``[A, 4]``:
  3 sizes x 3 aspect ratios per level, the sizes scaled to the image as RetinaNet's 32..812 px are
  to its 800 px inputs.
- ``ssd``: the same layout as ``retinanet`` with ``C + 1`` class columns (column 0 the background,
  softmax) on SSD default boxes (6 per location: 2 square, ratios 2 and 3; scales 0.1..0.6 of the
  image), as torchvision's ``SSDHead`` lays them out.

Output biases start at the priors the original detectors use (objectness and class priors for
YOLO, 0.01 foreground prior for FCOS), which matters for a short training budget.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn
import torch.nn.functional as F

from ...anchor_generators import AnchorGenerator, DefaultBoxGenerator
from ...losses.registry import LOSSES as REGISTRY

STRIDES = (8, 16, 32)

# Anchors (w, h pixels) for 128-pixel images, scaled with the image size; they span the synthetic
# objects' sizes (12..56 px) with a few aspect ratios for real data.
YOLOV5_ANCHORS_128 = ((10, 10, 12, 18, 18, 12), (24, 24, 20, 34, 34, 20), (44, 44, 36, 60, 60, 36))
YOLOV3_ANCHORS_128 = ((10, 10), (12, 18), (18, 12), (24, 24), (20, 34), (34, 20), (44, 44), (36, 60), (60, 36))
YOLOV3_MASKS = ((6, 7, 8), (3, 4, 5), (0, 1, 2))
YOLOV3_STRIDES = (32, 16, 8)


def scaled_anchors(anchors, img_size: int):
    """Anchors defined for 128-pixel images, scaled to ``img_size``."""
    s = img_size / 128.0
    return tuple(tuple(round(a * s, 2) for a in level) for level in anchors)


class ConvBN(nn.Sequential):
    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1) -> None:
        super().__init__(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2), nn.SiLU(inplace=True))


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.body = nn.Sequential(ConvBN(c, c, 1), ConvBN(c, c, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _ch(c: int, width: float) -> int:
    return max(8, int(round(c * width / 8)) * 8)


class Backbone(nn.Module):
    """Strided CNN: features at strides 8, 16, 32 with ``channels`` channels."""

    def __init__(self, width: float = 1.0) -> None:
        super().__init__()
        c = [_ch(x, width) for x in (16, 32, 64, 96, 128)]
        self.channels = (c[2], c[3], c[4])
        self.stem = nn.Sequential(ConvBN(3, c[0], 3, 2), ConvBN(c[0], c[1], 3, 2), Residual(c[1]))
        self.s8 = nn.Sequential(ConvBN(c[1], c[2], 3, 2), Residual(c[2]))
        self.s16 = nn.Sequential(ConvBN(c[2], c[3], 3, 2), Residual(c[3]))
        self.s32 = nn.Sequential(ConvBN(c[3], c[4], 3, 2), Residual(c[4]))

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        p3 = self.s8(self.stem(x))
        p4 = self.s16(p3)
        return [p3, p4, self.s32(p4)]


class FPN(nn.Module):
    """Top-down feature pyramid: every level gets ``out`` channels and the coarser context."""

    def __init__(self, channels: Sequence[int], out: int) -> None:
        super().__init__()
        self.lateral = nn.ModuleList(ConvBN(c, out, 1) for c in channels)
        self.smooth = nn.ModuleList(ConvBN(out, out, 3) for _ in channels)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        lat = [l(f) for l, f in zip(self.lateral, feats)]
        outs = [lat[-1]]
        for x in reversed(lat[:-1]):
            outs.insert(0, x + F.interpolate(outs[0], size=x.shape[-2:], mode="nearest"))
        return [s(o) for s, o in zip(self.smooth, outs)]


class YOLOv5Head(nn.Module):
    def __init__(self, c: int, num_classes: int, anchors, img_size: int) -> None:
        super().__init__()
        self.nc, self.na, self.no = num_classes, len(anchors[0]) // 2, num_classes + 5
        self.convs = nn.ModuleList(nn.Conv2d(c, self.na * self.no, 1) for _ in anchors)
        for conv, s in zip(self.convs, STRIDES):  # yolov5's Detect._initialize_biases
            b = conv.bias.data.view(self.na, -1)
            b[:, 4] += math.log(8 / (img_size / s) ** 2)
            b[:, 5:] += math.log(0.6 / (num_classes - 0.99)) if num_classes > 1 else 0.0

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        out = []
        for conv, f in zip(self.convs, feats):
            y = conv(f)
            b, _, h, w = y.shape
            out.append(y.view(b, self.na, self.no, h, w).permute(0, 1, 3, 4, 2).contiguous())
        return out


class YOLOv3Head(nn.Module):
    """Outputs in the order of the loss's layers (strides 32, 16, 8), darknet channel layout."""

    def __init__(self, c: int, num_classes: int, masks=YOLOV3_MASKS, img_size: int = 128) -> None:
        super().__init__()
        self.no = num_classes + 5
        self.convs = nn.ModuleList(nn.Conv2d(c, len(m) * self.no, 1) for m in masks)
        for conv, s in zip(self.convs, YOLOV3_STRIDES):
            b = conv.bias.data.view(len(masks[0]), -1)
            b[:, 4] += math.log(8 / (img_size / s) ** 2)
            b[:, 5:] += math.log(0.6 / (num_classes - 0.99)) if num_classes > 1 else 0.0

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        ordered = feats[::-1]  # the FPN gives strides 8, 16, 32
        return [conv(f) for conv, f in zip(self.convs, ordered)]


class FCOSHead(nn.Module):
    """FCOS head: classification and regression towers shared across levels (GroupNorm, as FCOS)."""

    def __init__(self, c: int, num_classes: int, prior: float = 0.01) -> None:
        super().__init__()

        def tower() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(inplace=True))

        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(c, num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(c, 4, 3, padding=1)
        self.ctrness = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))

    def forward(self, feats: List[torch.Tensor]):
        cls, reg, ctr, sizes = [], [], [], []
        for f in feats:
            b, _, h, w = f.shape
            sizes.append((h, w))
            t = self.cls_tower(f)
            r = self.reg_tower(f)
            cls.append(self.cls_logits(t).flatten(2).transpose(1, 2))
            reg.append(F.relu(self.bbox_reg(r)).flatten(2).transpose(1, 2))
            ctr.append(self.ctrness(r).flatten(2).transpose(1, 2))
        return torch.cat(cls, 1), torch.cat(reg, 1), torch.cat(ctr, 1), sizes


class YOLOv8Head(nn.Module):
    """Decoupled head per level: a box branch (4 * reg_max DFL bins) and a class branch."""

    def __init__(self, c: int, num_classes: int, reg_max: int = 16, img_size: int = 128) -> None:
        super().__init__()
        self.reg_max = reg_max
        self.box = nn.ModuleList(nn.Sequential(ConvBN(c, c, 3), nn.Conv2d(c, 4 * reg_max, 1)) for _ in STRIDES)
        self.cls = nn.ModuleList(nn.Sequential(ConvBN(c, c, 3), nn.Conv2d(c, num_classes, 1)) for _ in STRIDES)
        for b, k, s in zip(self.box, self.cls, STRIDES):  # ultralytics' Detect.bias_init
            b[-1].bias.data[:] = 1.0
            k[-1].bias.data[:] = math.log(5 / num_classes / (img_size / s) ** 2)

    def forward(self, feats: List[torch.Tensor]) -> List[torch.Tensor]:
        return [torch.cat((b(f), k(f)), 1) for b, k, f in zip(self.box, self.cls, feats)]


class RetinaNetHead(nn.Module):
    """RetinaNet head: classification and regression towers shared across levels, ``K`` anchors
    per location, outputs laid out as torchvision's ``RetinaNetHead`` lays them out."""

    def __init__(self, c: int, num_classes: int, generator, img_size: int, prior: float = 0.01,
                 background_column: bool = False) -> None:
        super().__init__()

        def tower() -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(inplace=True))

        self.k, self.nc, self.generator, self.img_size = generator.num_anchors_per_location()[0], num_classes, generator, img_size
        self.cls_tower, self.reg_tower = tower(), tower()
        self.cls_logits = nn.Conv2d(c, self.k * num_classes, 3, padding=1)
        self.bbox_reg = nn.Conv2d(c, self.k * 4, 3, padding=1)
        if background_column:  # softmax over [background, classes]: the background starts at 1 - prior
            bias = torch.zeros(self.k, num_classes)
            bias[:, 0] = math.log((1 - prior) / prior * (num_classes - 1))
            with torch.no_grad():
                self.cls_logits.bias.copy_(bias.reshape(-1))
        else:
            nn.init.constant_(self.cls_logits.bias, -math.log((1 - prior) / prior))  # RetinaNet's prior
        nn.init.zeros_(self.bbox_reg.bias)

    def _flat(self, y: torch.Tensor, n: int) -> torch.Tensor:
        b, _, h, w = y.shape  # [B, K * n, H, W] -> [B, H * W * K, n]
        return y.view(b, self.k, n, h, w).permute(0, 3, 4, 1, 2).reshape(b, -1, n)

    def forward(self, feats: List[torch.Tensor]):
        cls = [self._flat(self.cls_logits(self.cls_tower(f)), self.nc) for f in feats]
        reg = [self._flat(self.bbox_reg(self.reg_tower(f)), 4) for f in feats]
        sizes = [tuple(f.shape[-2:]) for f in feats]
        anchors = self.generator(sizes, (self.img_size, self.img_size), dtype=cls[0].dtype, device=cls[0].device)
        return torch.cat(cls, 1), torch.cat(reg, 1), anchors


def retinanet_anchor_generator(img_size: int) -> AnchorGenerator:
    """3 sizes (x 2^(k/3)) x aspect ratios 0.5, 1, 2 on P3-P5; 12, 24, 48 px at 128 px images."""
    s = img_size / 128.0
    sizes = tuple(tuple(round(x * s * 2 ** (k / 3), 2) for k in range(3)) for x in (12, 24, 48))
    return AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))


def _retinanet_head(c: int, num_classes: int, img_size: int, reg_max: int):
    gen = retinanet_anchor_generator(img_size)
    shared = dict(anchor_generator=gen, strides=STRIDES, image_size=(img_size, img_size))
    return RetinaNetHead(c, num_classes, gen, img_size), shared, {}


def ssd_default_box_generator() -> DefaultBoxGenerator:
    """6 default boxes per location on the demo's 3 levels (steps 8, 16, 32), scales 0.1..0.6."""
    return DefaultBoxGenerator([[2, 3]] * len(STRIDES), scales=[0.1, 0.2, 0.4, 0.6], steps=list(STRIDES))


def _ssd_head(c: int, num_classes: int, img_size: int, reg_max: int):
    gen = ssd_default_box_generator()
    shared = dict(default_box_generator=gen, strides=STRIDES, image_size=(img_size, img_size))
    head = RetinaNetHead(c, num_classes + 1, gen, img_size, background_column=True)
    return head, shared, dict(num_classes=num_classes + 1)  # SSD's classes count the background


def _yolov5_head(c: int, num_classes: int, img_size: int, reg_max: int):
    anchors = scaled_anchors(YOLOV5_ANCHORS_128, img_size)
    nl = len(STRIDES)
    # yolov5 train.py scales its hyp gains to the number of levels, classes and image size.
    gains = dict(box=0.05 * 3 / nl, cls=0.5 * num_classes / 80 * 3 / nl, obj=1.0 * (img_size / 640) ** 2 * 3 / nl)
    return YOLOv5Head(c, num_classes, anchors, img_size), dict(anchors=anchors, strides=STRIDES), gains


def _yolov3_head(c: int, num_classes: int, img_size: int, reg_max: int):
    anchors = scaled_anchors(YOLOV3_ANCHORS_128, img_size)
    config = dict(anchors=anchors, masks=YOLOV3_MASKS, strides=YOLOV3_STRIDES)
    return YOLOv3Head(c, num_classes, YOLOV3_MASKS, img_size), config, dict(img_size=(img_size, img_size))


def _fcos_head(c: int, num_classes: int, img_size: int, reg_max: int):
    return FCOSHead(c, num_classes), dict(strides=STRIDES), {}


def _yolov8_head(c: int, num_classes: int, img_size: int, reg_max: int):
    return YOLOv8Head(c, num_classes, reg_max, img_size), dict(strides=STRIDES, reg_max=reg_max), {}


#: The demo's head for each detector loss it trains (model architecture, one builder per head
#: layout): ``(head, config the head and its loss share, further loss arguments)``. The loss
#: itself comes from :data:`detloss.losses.registry.LOSSES`.
HEADS = {
    "yolov5": _yolov5_head,
    "yolov3": _yolov3_head,
    "fcos": _fcos_head,
    "yolov8": _yolov8_head,
    "retinanet": _retinanet_head,
    "ssd": _ssd_head,
}
#: The registered losses the demo has a head for.
LOSSES = tuple(name for name in REGISTRY if name in HEADS)


class Detector(nn.Module):
    """Backbone + FPN + the head of ``loss`` (one of :data:`LOSSES`).

    ``forward(images [B, 3, S, S])`` returns the raw head outputs in the form the loss takes
    (a tuple when the loss takes several arguments before its targets). ``config`` holds what the
    head and its loss share (anchors, strides, ...) and ``loss_kwargs``, the arguments of
    ``LOSSES[loss]`` for this head (:meth:`build_loss`).
    """

    def __init__(self, loss: str, num_classes: int, img_size: int = 128, width: float = 1.0,
                 reg_max: int = 16) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {loss!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes: expected at least 1, got {num_classes}")
        if img_size % 32:
            raise ValueError(f"img_size: expected a multiple of 32, got {img_size}")
        self.loss, self.num_classes, self.img_size = loss, num_classes, img_size
        self.backbone = Backbone(width)
        c = _ch(64, width)
        self.neck = FPN(self.backbone.channels, c)
        self.head, shared, extra = HEADS[loss](c, num_classes, img_size, reg_max)
        self.config: Dict = {"loss": loss, "num_classes": num_classes, "img_size": img_size, **shared}
        self.config["loss_kwargs"] = {"num_classes": num_classes, **shared, **extra}

    def build_loss(self, **kwargs):
        """The registered loss for this head (``kwargs`` added to ``config["loss_kwargs"]``)."""
        return REGISTRY[self.loss](**{**self.config["loss_kwargs"], **kwargs})

    def forward(self, images: torch.Tensor):
        return self.head(self.neck(self.backbone(images)))


def head_shapes(model: Detector, batch: int = 1) -> Tuple:
    """The output shapes for a ``batch`` of images (for checks and documentation)."""
    with torch.no_grad():
        out = model(torch.zeros(batch, 3, model.img_size, model.img_size))
    if isinstance(out, tuple):
        return tuple(o.shape if torch.is_tensor(o) else o for o in out)
    return tuple(o.shape for o in out)
