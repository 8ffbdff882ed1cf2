"""Benchmark: :class:`detloss.FCOSLoss` against torchvision's own ``FCOS.compute_loss``
(torchvision 0.29.1), in the same process on the same inputs.

The peer is torchvision's ``FCOS`` model built with the smallest backbone it accepts (a module
with ``out_channels = 32``, the least its GroupNorm(32) head takes; the backbone never runs),
``num_classes`` classes and its default anchor generator (sizes 8..128, one per level, strides
8..128 at 640 px). Its ``compute_loss(targets, head_outputs, anchors, num_anchors_per_level)`` is
called as ``FCOS.forward`` calls it in training: the anchors come from the model's own
``anchor_generator`` (computed once, outside the timing, as an input). Inputs: synthetic head
outputs ``cls_logits [B, P, C]``, ``bbox_regression [B, P, 4]`` (non-negative),
``bbox_ctrness [B, P, 1]`` (float32) and boxes of log-uniform size (6 px to half the image,
xyxy pixels). Before timing, the totals (the sum of the three terms, what the trainer
backpropagates), the three terms and the gradients are checked equal.

Run: ``python benchmarks/run.py fcos`` (``--quick`` for tiny sizes; ``--peers`` to require the
peer, as ``make bench-peers`` does).
"""
from __future__ import annotations

import argparse
import math
from typing import List, Optional, Sequence, Tuple

import torch

from ._common import Side, add_detector_arguments, apply_quick, import_peer, run_suite, torchvision_anchors

PEER = "torchvision FCOS.compute_loss"
STRIDES = (8, 16, 32, 64, 128)
TERMS = (("cls", "classification"), ("box", "bbox_regression"), ("centerness", "bbox_ctrness"))


def feature_sizes(size: int) -> List[Tuple[int, int]]:
    return [(math.ceil(size / s), math.ceil(size / s)) for s in STRIDES]


def make_inputs(batch: int, size: int, num_classes: int, boxes_per_image: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = sum(h * w for h, w in feature_sizes(size))
    heads = [
        torch.randn(batch, p, num_classes, generator=g),
        torch.rand(batch, p, 4, generator=g) * 4,
        torch.randn(batch, p, 1, generator=g),
    ]
    targets = []
    for _ in range(batch):
        wh = torch.exp(torch.rand(boxes_per_image, 2, generator=g) * math.log(size / 2 / 6)) * 6
        xy = torch.rand(boxes_per_image, 2, generator=g) * (size - wh)
        targets.append({"boxes": torch.cat((xy, xy + wh), dim=1),
                        "labels": torch.randint(0, num_classes, (boxes_per_image,), generator=g)})
    return heads, targets


def build_peer(nc: int):
    """torchvision's FCOS with the smallest backbone stand-in, or PeerMissing."""
    fcos = import_peer("torchvision.models.detection.fcos", "torchvision==0.29.1")
    backbone = torch.nn.Module()
    backbone.out_channels = 32
    return fcos.FCOS(backbone, num_classes=nc)


def peer_anchors(model, batch: int, size: int):
    """The anchors and per-level counts FCOS.forward hands compute_loss, from its own generator."""
    sizes = feature_sizes(size)
    return torchvision_anchors(model, batch, size, sizes), [h * w for h, w in sizes]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_detector_arguments(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss import FCOSLoss

    ap = argparse.ArgumentParser(prog="benchmarks/run.py fcos", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    apply_quick(args, size=128)
    ours_loss = FCOSLoss(args.classes, strides=STRIDES)
    sizes = feature_sizes(args.size)

    def case(nb: int, peer) -> Tuple[Side, Optional[Side]]:
        heads, targets = make_inputs(args.batch, args.size, args.classes, nb)
        leaves = [h.requires_grad_() for h in heads]

        def ours_terms():
            out = ours_loss(*leaves, sizes, targets)
            return {k: float(out.components[k]) for k, _ in TERMS}

        ours = Side("detloss", lambda: ours_loss(*leaves, sizes, targets).total, leaves, ours_terms)
        if peer is None:
            return ours, None
        anchors, counts = peer_anchors(peer, args.batch, args.size)
        outputs = dict(zip(("cls_logits", "bbox_regression", "bbox_ctrness"), leaves))

        def peer_terms():
            d = peer.compute_loss(targets, outputs, anchors, counts)
            return {k: float(d[n].detach()) for k, n in TERMS}

        theirs = Side(PEER, lambda: sum(peer.compute_loss(targets, outputs, anchors, counts).values()), leaves,
                      peer_terms)
        return ours, theirs

    p = sum(h * w for h, w in sizes)
    title = (f"FCOS loss: batch {args.batch}, {args.size}x{args.size} ({p} points/image), {args.classes} classes, "
             f"float32, CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    return run_suite("fcos", args, title, PEER, lambda: build_peer(args.classes), case)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
