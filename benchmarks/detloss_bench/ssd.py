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
from typing import List, Optional, Sequence, Tuple

import torch

from ._common import Side, add_detector_arguments, apply_quick, import_peer, run_suite
from .retinanet import MatchingGrowth, candidate_pairs, check_same_matches, random_targets

PEER = "torchvision SSD matching + SSD.compute_loss"
SSD300_FEATURES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
SSD300_ASPECT_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
SSD300_SCALES = [0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05]
SSD300_STEPS = [8, 16, 32, 64, 100, 300]
TERMS = (("cls", "classification"), ("box", "bbox_regression"))


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
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(batch, 3, size, size), [(size, size)] * batch)
    return model.anchor_generator(images, [torch.zeros(batch, 1, h, w) for h, w in SSD300_FEATURES])


def peer_matches(model, targets, anchors) -> List[torch.Tensor]:
    """The matching loop of ``SSD.forward`` in training, image by image."""
    from torchvision.ops import box_iou

    out = []
    for t, a in zip(targets, anchors):
        if t["boxes"].numel() == 0:
            out.append(torch.full((a.shape[0],), -1, dtype=torch.int64, device=a.device))
        else:
            out.append(model.proposal_matcher(box_iou(t["boxes"], a)))
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_detector_arguments(parser, batch=8, size=300, classes=91, boxes=(8, 10, 100, 500), repeats=3)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss import SSDLoss
    from detloss.assign.iou_matcher import AnchorIndexCache, assign_ssd

    ap = argparse.ArgumentParser(prog="benchmarks/run.py ssd", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    apply_quick(args, size=300)
    ours_loss = SSDLoss(args.classes)
    growth = MatchingGrowth("matching")

    def case(nb: int, peer) -> Tuple[Side, Optional[Side]]:
        anchors, heads, targets = make_inputs(args.batch, args.size, args.classes, nb)
        leaves = [h.requires_grad_() for h in heads]

        def ours_terms():
            out = ours_loss(*leaves, anchors, targets)
            return {k: float(out.components[k]) for k, _ in TERMS}

        ours = Side("detloss", lambda: ours_loss(*leaves, anchors, targets).total, leaves, ours_terms)
        a = anchors[0].shape[0]
        cache = AnchorIndexCache()  # the loss keeps the anchors' index between calls too
        cand = candidate_pairs(targets, anchors[0], ours_loss.iou_thresh)
        if peer is None:
            growth.measure(nb, cand, a * nb * args.batch, lambda: assign_ssd(targets, anchors, index_cache=cache), None,
                           args.repeats, args.warmup)
            return ours, None
        tv_anchors = peer_anchors(peer, args.batch, args.size)
        outputs = dict(zip(("cls_logits", "bbox_regression"), leaves))

        def peer_losses():
            return peer.compute_loss(targets, outputs, tv_anchors, peer_matches(peer, targets, tv_anchors))

        def peer_terms():  # called by the equality check, before anything is timed
            check_same_matches(ours_loss(*leaves, anchors, targets).stats["matched_idxs"],
                               peer_matches(peer, targets, tv_anchors), anchors, tv_anchors)
            d = peer_losses()
            return {k: float(d[n].detach()) for k, n in TERMS}

        theirs = Side(PEER, lambda: sum(peer_losses().values()), leaves, peer_terms)
        growth.measure(nb, cand, a * nb * args.batch, lambda: assign_ssd(targets, anchors, index_cache=cache),
                       lambda: peer_matches(peer, targets, tv_anchors), args.repeats, args.warmup)
        return ours, theirs

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
