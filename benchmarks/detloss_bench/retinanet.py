"""Benchmark: :class:`detloss.RetinaNetLoss` against torchvision's own ``RetinaNet.compute_loss``
(torchvision 0.29.1), in the same process on the same inputs.

Default sizes: batch 8 of 640 px images, which torchvision's RetinaNet (``min_size=800``) resizes
and pads to 800 x 800: P3-P7 feature maps of 100, 50, 25, 13 and 7 cells, 9 anchors per location,
120,087 anchors per image; 91 classes (torchvision's COCO head); 8, 10, 100 and 500 boxes per
image (boxes of log-uniform sides from 6 px to half the image, anywhere inside it). The peer is
torchvision's ``RetinaNet`` model with a stand-in backbone that never runs; its
``compute_loss(targets, head_outputs, anchors)`` is called as ``RetinaNet.forward`` calls it in
training (its matching: dense ``box_iou`` of boxes x anchors per image and ``Matcher`` with
low-quality matches; then ``RetinaNetHead.compute_loss``), with the anchors of torchvision's own
``AnchorGenerator`` (one equal tensor per image, computed once, as an input). Before timing, the
totals (the sum of the two terms, what the trainer backpropagates), the terms and the gradients
are checked equal, and so are the matches (``matched_idxs``, exactly).

After the table, the matching alone (detloss's :func:`~detloss.assign.iou_matcher.assign_iou`
against torchvision's ``box_iou`` + ``Matcher`` per image): its time and peak memory at each box
count, and their growth from the fewest to the most boxes, against the growth of the number of
anchor-box candidate pairs (pairs whose IoU can reach the lower threshold) and of anchors x boxes.

Run: ``python benchmarks/run.py retinanet`` (``--quick`` for tiny sizes; ``--peers`` to require
the peer, as ``make bench-peers`` does).
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._anchors import anchor_case, peer_matches, random_targets
from ._common import add_detector_arguments, apply_quick, import_peer, run_suite, torchvision_anchors

PEER = "torchvision RetinaNet.compute_loss"
STRIDES = (8, 16, 32, 64, 128)


def feature_sizes(size: int) -> List[Tuple[int, int]]:
    return [(math.ceil(size / s), math.ceil(size / s)) for s in STRIDES]


def make_inputs(batch: int, size: int, num_classes: int, boxes_per_image: int, seed: int = 0):
    """Anchors (one equal ``[A, 4]`` tensor per image, as torchvision's generator hands them),
    head outputs ``cls_logits [B, A, C]``, ``bbox_regression [B, A, 4]`` and the targets."""
    from detloss.anchor_generators import AnchorGenerator

    g = torch.Generator().manual_seed(seed)
    anchors = AnchorGenerator()(feature_sizes(size), (size, size))
    a = anchors.shape[0]
    heads = [torch.randn(batch, a, num_classes, generator=g) - 2.0, torch.randn(batch, a, 4, generator=g) * 0.2]
    targets = random_targets(batch, size, num_classes, boxes_per_image, g)
    return [anchors.clone() for _ in range(batch)], heads, targets


def build_peer(nc: int):
    """torchvision's RetinaNet (a stand-in backbone that never runs), or PeerMissing."""
    retinanet = import_peer("torchvision.models.detection.retinanet", "torchvision==0.29.1")
    backbone = torch.nn.Module()
    backbone.out_channels = 8
    return retinanet.RetinaNet(backbone, num_classes=nc)


def peer_anchors(model, batch: int, size: int) -> List[torch.Tensor]:
    """The anchors RetinaNet.forward hands compute_loss, from the model's own generator."""
    return torchvision_anchors(model, batch, size, feature_sizes(size))


def peer_losses(model, targets, outputs, anchors) -> Dict[str, torch.Tensor]:
    """``RetinaNet.compute_loss`` as ``RetinaNet.forward`` calls it (its matching inside)."""
    return model.compute_loss(targets, outputs, anchors)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_detector_arguments(parser, batch=8, size=800, classes=91, boxes=(8, 10, 100, 500), repeats=3)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss import RetinaNetLoss
    from detloss.assign.iou_matcher import assign_iou

    ap = argparse.ArgumentParser(prog="benchmarks/run.py retinanet", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    apply_quick(args, size=128)
    ours_loss = RetinaNetLoss(args.classes)
    match = lambda targets, anchors, cache: assign_iou(targets, anchors, index_cache=cache)  # noqa: E731
    case, growth = anchor_case(args, ours_loss, make_inputs, match, ours_loss.bg_iou_thresh, PEER, peer_anchors, peer_matches,
                               peer_losses)
    a = sum(h * w for h, w in feature_sizes(args.size)) * 9
    title = (f"RetinaNet loss: batch {args.batch}, {args.size}x{args.size} ({a} anchors/image), {args.classes} classes, "
             f"float32, CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    code = run_suite("retinanet", args, title, PEER, lambda: build_peer(args.classes), case)
    if code == 0:
        growth.report(PEER.replace("compute_loss", "matching"))
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
