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

from ._common import (
    EqualityError,
    Side,
    add_detector_arguments,
    alternating_medians,
    apply_quick,
    fmt_mb,
    fmt_ms,
    import_peer,
    peak_rss,
    print_table,
    run_suite,
)

PEER = "torchvision RetinaNet.compute_loss"
STRIDES = (8, 16, 32, 64, 128)
TERMS = (("cls", "classification"), ("box", "bbox_regression"))


def feature_sizes(size: int) -> List[Tuple[int, int]]:
    return [(math.ceil(size / s), math.ceil(size / s)) for s in STRIDES]


def random_targets(batch: int, size: int, num_classes: int, boxes_per_image: int, g: torch.Generator,
                   first_label: int = 0) -> List[Dict[str, torch.Tensor]]:
    """Boxes of log-uniform sides from 6 px to half the image, anywhere inside it."""
    targets = []
    for _ in range(batch):
        wh = torch.exp(torch.rand(boxes_per_image, 2, generator=g) * math.log(size / 2 / 6)) * 6
        xy = torch.rand(boxes_per_image, 2, generator=g) * (size - wh)
        labels = torch.randint(first_label, num_classes, (boxes_per_image,), generator=g)
        targets.append({"boxes": torch.cat((xy, xy + wh), dim=1), "labels": labels})
    return targets


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
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(batch, 3, size, size), [(size, size)] * batch)
    return model.anchor_generator(images, [torch.zeros(batch, 1, h, w) for h, w in feature_sizes(size)])


def peer_matches(model, targets, anchors) -> List[torch.Tensor]:
    """torchvision's matching as ``RetinaNet.compute_loss`` does it, image by image."""
    from torchvision.ops import box_iou

    out = []
    for t, a in zip(targets, anchors):
        if t["boxes"].numel() == 0:
            out.append(torch.full((a.shape[0],), -1, dtype=torch.int64))
        else:
            out.append(model.proposal_matcher(box_iou(t["boxes"], a)))
    return out


def check_same_matches(ours: Sequence[torch.Tensor], peer: Sequence[torch.Tensor], anchors, tv_anchors) -> None:
    """Raise :class:`EqualityError` unless both give the same anchors and ``matched_idxs``."""
    if not all(torch.equal(x, y) for x, y in zip(anchors, tv_anchors)):
        raise EqualityError("detloss's anchor generator and torchvision's give different anchors")
    for i, (m, p) in enumerate(zip(ours, peer)):
        if not torch.equal(m, p):
            raise EqualityError(f"matched_idxs of image {i}: detloss and torchvision differ at {int((m != p).sum())} anchors")


def candidate_pairs(targets, anchors: torch.Tensor, min_iou: float) -> int:
    """The anchor-box pairs of the batch whose IoU reaches ``min_iou`` (what the matcher must
    visit; it also visits the pairs its search cannot rule out without computing them)."""
    from detloss.assign.iou_matcher import overlapping_pairs

    return sum(int(overlapping_pairs(t["boxes"], anchors, min_iou=min_iou)[0].numel()) for t in targets)


class MatchingGrowth:
    """The matching alone at each box count: ``rows[boxes] = (candidates, anchors x boxes,
    detloss (time, peak), peer (time, peak))``, printed after the suite's table."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.rows: Dict[int, Tuple[int, int, Tuple[float, int], Optional[Tuple[float, int]]]] = {}

    def measure(self, nb: int, candidates: int, dense: int, ours, peer, repeats: int, warmup: int) -> None:
        fns = [ours] + ([peer] if peer is not None else [])
        times = alternating_medians(fns, repeats, warmup)
        sides = [(t, peak_rss(f)) for t, f in zip(times, fns)]
        self.rows[nb] = (candidates, dense, sides[0], sides[1] if peer is not None else None)

    def report(self, peer_label: str) -> None:
        if not self.rows:
            return
        print(f"{self.what} alone (median time, peak resident memory; ratios {peer_label} / detloss):")
        table = []
        for nb, (cand, dense, (ot, om), peer) in self.rows.items():
            pt, pm = peer if peer is not None else (None, None)
            table.append([nb, cand, dense, fmt_ms(ot), "-" if pt is None else fmt_ms(pt),
                          "-" if pt is None else f"{pt / ot:.2f}x", fmt_mb(om), "-" if pm is None else fmt_mb(pm)])
        print_table(["boxes/img", "candidates", "anchors x boxes", "detloss", "peer", "speed-up", "detloss peak",
                     "peer peak"], table)
        lo, hi = min(self.rows), max(self.rows)
        if lo != hi:
            (c0, d0, o0, p0), (c1, d1, o1, p1) = self.rows[lo], self.rows[hi]
            print(f"growth {lo} -> {hi} boxes/img: candidates x{c1 / max(c0, 1):.2f}, anchors x boxes x{d1 / d0:.2f}; "
                  f"detloss time x{o1[0] / o0[0]:.2f}, peak x{o1[1] / max(o0[1], 1):.2f}"
                  + ("" if p0 is None or p1 is None else
                     f"; peer time x{p1[0] / p0[0]:.2f}, peak x{p1[1] / max(p0[1], 1):.2f}"))
        print()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_detector_arguments(parser, batch=8, size=800, classes=91, boxes=(8, 10, 100, 500), repeats=3)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss import RetinaNetLoss
    from detloss.assign.iou_matcher import AnchorIndexCache, assign_iou

    ap = argparse.ArgumentParser(prog="benchmarks/run.py retinanet", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    apply_quick(args, size=128)
    ours_loss = RetinaNetLoss(args.classes)
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
        cand = candidate_pairs(targets, anchors[0], ours_loss.bg_iou_thresh)
        if peer is None:
            growth.measure(nb, cand, a * nb * args.batch, lambda: assign_iou(targets, anchors, index_cache=cache), None,
                           args.repeats, args.warmup)
            return ours, None
        tv_anchors = peer_anchors(peer, args.batch, args.size)
        outputs = dict(zip(("cls_logits", "bbox_regression"), leaves))

        def peer_terms():  # called by the equality check, before anything is timed
            check_same_matches(ours_loss(*leaves, anchors, targets).stats["matched_idxs"],
                               peer_matches(peer, targets, tv_anchors), anchors, tv_anchors)
            d = peer.compute_loss(targets, outputs, tv_anchors)
            return {k: float(d[n].detach()) for k, n in TERMS}

        theirs = Side(PEER, lambda: sum(peer.compute_loss(targets, outputs, tv_anchors).values()), leaves, peer_terms)
        growth.measure(nb, cand, a * nb * args.batch, lambda: assign_iou(targets, anchors, index_cache=cache),
                       lambda: peer_matches(peer, targets, tv_anchors), args.repeats, args.warmup)
        return ours, theirs

    a = sum(h * w for h, w in feature_sizes(args.size)) * 9
    title = (f"RetinaNet loss: batch {args.batch}, {args.size}x{args.size} ({a} anchors/image), {args.classes} classes, "
             f"float32, CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    code = run_suite("retinanet", args, title, PEER, lambda: build_peer(args.classes), case)
    if code == 0:
        growth.report(PEER.replace("compute_loss", "matching"))
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
