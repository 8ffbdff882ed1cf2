"""Benchmark: :class:`detloss.SSDLoss` against torchvision's own SSD matching and
``SSD.compute_loss`` (torchvision 0.29.1), in the same process on the same inputs.

Default sizes: batch 8 at 300 x 300 with SSD300's default boxes (8,732 per image, torchvision's
``DefaultBoxGenerator`` of ``ssd300_vgg16``), 91 classes (torchvision's COCO head, class 0 the
background), 8, 10, 100 and 500 boxes per image (log-uniform sides from 6 px to half the image,
labels 1..90). The peer is torchvision's ``SSD`` model with a stand-in backbone that never runs;
its loss is what ``SSD.forward`` computes in training: the matching loop (per image ``box_iou``
of boxes x default boxes and ``SSDMatcher``; an image without boxes all background), then
``SSD.compute_loss(targets, head_outputs, anchors, matched_idxs)`` (cross-entropy, hard negative
mining by a full sort, smooth L1), with the default boxes of the model's own generator (one equal
tensor per image, computed once, as an input). Before timing, the totals, the terms, the
gradients and the matches (``matched_idxs``, exactly) are checked equal; the classification
gradient is compared on all rows (the random logits leave no ties at the mining cut-off).

After the table, the matching alone (detloss's :func:`~detloss.assign.iou_matcher.assign_ssd`
against the matching loop), its growth with the boxes against that of the candidate pairs.

Run: ``python benchmarks/run.py ssd`` (``--quick`` for tiny sizes; ``--peers`` to require the
peer, as ``make bench-peers`` does).
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

import torch

from ._anchors import anchor_case, peer_matches, random_targets
from ._common import add_detector_arguments, apply_quick, import_peer, run_suite, torchvision_anchors

PEER = "torchvision SSD matching + SSD.compute_loss"
SSD300_FEATURES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
SSD300_ASPECT_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
SSD300_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
SSD300_STEPS = [8, 16, 32, 64, 100, 300]


def make_inputs(batch: int, size: int, num_classes: int, boxes_per_image: int, seed: int = 0):
    """Default boxes (one equal ``[A, 4]`` tensor per image), head outputs and targets."""
    from detloss.anchor_generators import DefaultBoxGenerator

    g = torch.Generator().manual_seed(seed)
    anchors = DefaultBoxGenerator.ssd300()(SSD300_FEATURES, (size, size))
    a = anchors.shape[0]
    heads = [torch.randn(batch, a, num_classes, generator=g), torch.randn(batch, a, 4, generator=g)]
    targets = random_targets(batch, size, num_classes, boxes_per_image, g, first_label=1)
    return [anchors.clone() for _ in range(batch)], heads, targets


def build_peer(nc: int, size: int):
    """torchvision's SSD300 layout (a stand-in backbone that never runs), or PeerMissing."""
    ssd = import_peer("torchvision.models.detection.ssd", "torchvision==0.29.1")
    anchor_utils = import_peer("torchvision.models.detection.anchor_utils", "torchvision==0.29.1")
    generator = anchor_utils.DefaultBoxGenerator(SSD300_ASPECT_RATIOS, scales=SSD300_SCALES, steps=SSD300_STEPS)
    head = ssd.SSDHead([8] * len(SSD300_FEATURES), generator.num_anchors_per_location(), nc)
    return ssd.SSD(torch.nn.Identity(), generator, (size, size), nc, head=head)


def peer_anchors(model, batch: int, size: int) -> List[torch.Tensor]:
    """The default boxes SSD.forward hands its matching and compute_loss, from its own generator."""
    return torchvision_anchors(model, batch, size, SSD300_FEATURES)


def peer_losses(model, targets, outputs, anchors) -> Dict[str, torch.Tensor]:
    """What ``SSD.forward`` computes in training: its matching loop, then ``SSD.compute_loss``."""
    return model.compute_loss(targets, outputs, anchors, peer_matches(model, targets, anchors))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_detector_arguments(parser, batch=8, size=300, classes=91, boxes=(8, 10, 100, 500), repeats=3)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss import SSDLoss
    from detloss.assign.iou_matcher import assign_ssd

    ap = argparse.ArgumentParser(prog="benchmarks/run.py ssd", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    apply_quick(args, size=300)
    ours_loss = SSDLoss(args.classes)
    match = lambda targets, anchors, cache: assign_ssd(targets, anchors, index_cache=cache)  # noqa: E731
    case, growth = anchor_case(args, ours_loss, make_inputs, match, ours_loss.iou_thresh, PEER, peer_anchors, peer_matches,
                               peer_losses)

    a = sum(h * w * k for (h, w), k in zip(SSD300_FEATURES, (4, 6, 6, 6, 4, 4)))
    title = (f"SSD loss (matching included): batch {args.batch}, SSD300 {args.size}x{args.size} ({a} default "
             f"boxes/image), {args.classes} classes, float32, CPU, {torch.get_num_threads()} threads, "
             f"median of {args.repeats}")
    code = run_suite("ssd", args, title, PEER, lambda: build_peer(args.classes, args.size), case)
    if code == 0:
        growth.report("torchvision SSD matching")
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
