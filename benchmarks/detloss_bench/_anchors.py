"""What the RetinaNet and SSD suites share: synthetic targets, the exact check of the matches,
the count of candidate pairs, the measurement of the matching alone and the per-box-count case
(detloss's loss and torchvision's, as :func:`~detloss_bench._common.run_suite` takes them)."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._common import EqualityError, Side, alternating_medians, fmt_mb, fmt_ms, peak_rss, print_table

TERMS = (("cls", "classification"), ("box", "bbox_regression"))


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


def peer_matches(model, targets, anchors) -> List[torch.Tensor]:
    """torchvision's matching, image by image, as ``RetinaNet.compute_loss`` and ``SSD.forward``
    run it: ``model.proposal_matcher(box_iou(boxes, anchors))``, an image without boxes all
    background (-1)."""
    from torchvision.ops import box_iou

    out = []
    for t, a in zip(targets, anchors):
        if t["boxes"].numel() == 0:
            out.append(torch.full((a.shape[0],), -1, dtype=torch.int64, device=a.device))
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


def anchor_case(args, ours_loss, make_inputs: Callable, match: Callable, min_iou: float, peer_label: str,
                peer_anchors: Callable, peer_matches: Callable, peer_losses: Callable):
    """The ``case(boxes, peer)`` of :func:`~detloss_bench._common.run_suite` for an anchor loss:
    ``make_inputs(batch, size, classes, boxes)`` gives anchors, head outputs and targets;
    ``match(targets, anchors, index_cache)`` is detloss's matching; ``peer_anchors(model, batch,
    size)``, ``peer_matches(model, targets, anchors)`` and ``peer_losses(model, targets, outputs,
    anchors)`` (torchvision's loss dict) the peer's. The equality check compares the anchors and
    ``matched_idxs`` exactly before the values. Returns ``(case, growth)``: the matching alone is
    measured into ``growth`` (a :class:`MatchingGrowth`), to report after the suite's table."""
    from detloss.assign.iou_matcher import AnchorIndexCache

    growth = MatchingGrowth("matching")

    def case(nb: int, peer) -> Tuple[Side, Optional[Side]]:
        anchors, heads, targets = make_inputs(args.batch, args.size, args.classes, nb)
        leaves = [h.requires_grad_() for h in heads]

        def ours_terms():
            out = ours_loss(*leaves, anchors, targets)
            return {k: float(out.components[k]) for k, _ in TERMS}

        ours = Side("detloss", lambda: ours_loss(*leaves, anchors, targets).total, leaves, ours_terms)
        cache = AnchorIndexCache()  # the loss keeps the anchors' index between calls too
        cand = candidate_pairs(targets, anchors[0], min_iou)
        dense = anchors[0].shape[0] * nb * args.batch
        if peer is None:
            growth.measure(nb, cand, dense, lambda: match(targets, anchors, cache), None, args.repeats, args.warmup)
            return ours, None
        tv_anchors = peer_anchors(peer, args.batch, args.size)
        outputs = dict(zip(("cls_logits", "bbox_regression"), leaves))

        def peer_terms():  # called by the equality check, before anything is timed
            check_same_matches(ours_loss(*leaves, anchors, targets).stats["matched_idxs"],
                               peer_matches(peer, targets, tv_anchors), anchors, tv_anchors)
            d = peer_losses(peer, targets, outputs, tv_anchors)
            return {k: float(d[n].detach()) for k, n in TERMS}

        theirs = Side(peer_label, lambda: sum(peer_losses(peer, targets, outputs, tv_anchors).values()), leaves,
                      peer_terms)
        growth.measure(nb, cand, dense, lambda: match(targets, anchors, cache),
                       lambda: peer_matches(peer, targets, tv_anchors), args.repeats, args.warmup)
        return ours, theirs

    return case, growth
