"""SSD loss benchmark: SSDLoss against torchvision's SSD matching + SSD.compute_loss, same process.

Default sizes: batch 8 at 300 x 300 with SSD300's default boxes (8732 per image), 91 classes
(torchvision's COCO head), 10 and 500 boxes per image. The peer is torchvision's own code (needs
torchvision, e.g. the integrations environment): the matching loop of ``SSD.forward`` (dense
``box_iou`` and ``SSDMatcher`` per image, called as SSD.forward calls them) followed by
``SSD.compute_loss`` (cross-entropy, hard negative mining by a full sort, smooth L1). Both are
checked to agree before timing.
"""
from __future__ import annotations

import argparse
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from detloss.anchor_generators import DefaultBoxGenerator
from detloss.losses.ssd import SSDLoss
from ._common import fmt_mb, fmt_ms, median_time, peak_memory, print_table
from .retinanet import _fwd_bwd, random_targets, torchvision_or_exit

SSD300_FEATURES = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]


def torchvision_ssd(num_classes: int, generator):
    """A torchvision SSD whose matching and compute_loss are the peer (its backbone never runs)."""
    tv = torchvision_or_exit()
    ssd = tv.models.detection.ssd
    head = ssd.SSDHead([8] * 6, generator.num_anchors_per_location(), num_classes)
    return ssd.SSD(torch.nn.Identity(), generator, (300, 300), num_classes, head=head)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--classes", type=int, default=91)
    ap.add_argument("--boxes", type=int, nargs="+", default=[10, 500], help="boxes per image")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke test)")
    ap.add_argument("--peers", action="store_true", help="accepted for `run.py all --peers`: the peer is always torchvision")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench ssd", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.batch, args.classes, args.boxes, args.repeats = 2, 5, [3, 20], 1
    tv = torchvision_or_exit()
    tv_gen = tv.models.detection.anchor_utils.DefaultBoxGenerator(
        [[2], [2, 3], [2, 3], [2, 3], [2], [2]], scales=[0.07, 0.15, 0.33, 0.51, 0.69, 0.87, 1.05],
        steps=[8, 16, 32, 64, 100, 300],
    )
    peer_model = torchvision_ssd(args.classes, tv_gen)
    loss_fn = SSDLoss(args.classes)
    anchors0 = DefaultBoxGenerator.ssd300()(SSD300_FEATURES, (300, 300))
    num_anchors = anchors0.shape[0]
    rows: List[List[object]] = []
    results: Dict[str, Dict[int, Tuple[float, int]]] = {"detloss": {}, "torchvision": {}}
    for nb in args.boxes:
        g = torch.Generator().manual_seed(0)
        anchors = [anchors0.clone() for _ in range(args.batch)]
        heads = [torch.randn(args.batch, num_anchors, args.classes, generator=g),
                 torch.randn(args.batch, num_anchors, 4, generator=g)]
        targets = random_targets(args.batch, 300, args.classes, nb, g, first_label=1)
        leaves = [h.clone().requires_grad_() for h in heads]

        def peer_match():
            return [peer_model.proposal_matcher(tv.ops.box_iou(t["boxes"], a)) for t, a in zip(targets, anchors)]

        def peer(cls=leaves[0], reg=leaves[1]):
            out = peer_model.compute_loss(targets, {"cls_logits": cls, "bbox_regression": reg}, anchors, peer_match())
            return out["classification"] + out["bbox_regression"]

        def ours(cls=leaves[0], reg=leaves[1]):
            return loss_fn(cls, reg, anchors, targets)

        with torch.no_grad():
            mine = ours(*heads)
            want = peer(*heads)
            if not math.isclose(float(mine.total), float(want), rel_tol=1e-4):
                raise RuntimeError(f"SSDLoss {float(mine.total)} and torchvision {float(want)} disagree")
            for m, p in zip(mine.stats["matched_idxs"], peer_match()):
                if not torch.equal(m, p):
                    raise RuntimeError("matched_idxs: detloss and torchvision disagree")
        for label, fn in (("detloss", lambda: ours().total), ("torchvision", peer)):
            t = median_time(_fwd_bwd(fn), repeats=args.repeats, warmup=1)
            results[label][nb] = (t, peak_memory(_fwd_bwd(fn)))
        for label in results:
            t, m = results[label][nb]
            bt, bm = results["torchvision"][nb]
            rows.append([nb, mine.stats["num_pos"], label, fmt_ms(t), fmt_mb(m), f"{t / bt:.3f}x", f"{m / bm:.3f}x"])
    print(f"\nSSD loss (matching included) forward + backward: batch {args.batch}, SSD300 ({num_anchors} default "
          f"boxes/image), {args.classes} classes, float32, {torch.get_num_threads()} threads; "
          f"peer: torchvision {tv.__version__} SSD matching + SSD.compute_loss")
    print_table(["boxes/img", "positives", "method", "fwd+bwd", "peak mem", "time/tv", "mem/tv"], rows)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
