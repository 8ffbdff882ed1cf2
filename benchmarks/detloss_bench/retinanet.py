"""RetinaNet loss benchmark: RetinaNetLoss against torchvision's RetinaNet.compute_loss, same process.

Default sizes: batch 8 of 640 px images, which torchvision's transform (min_size 800) brings to
800 x 800: P3-P7 with 9 anchors per location, 120,087 anchors per image; 91 classes (torchvision's
COCO head); 10 and 500 boxes per image. The peer is torchvision's own code (needs torchvision,
e.g. the integrations environment): ``RetinaNet.compute_loss`` of a RetinaNet model (dense
``box_iou`` of boxes x anchors per image, ``Matcher``, ``RetinaNetHead.compute_loss``). Both are
checked to give the same matches and losses before anything is timed; then forward + backward
time and peak memory, and the matching alone.
"""
from __future__ import annotations

import argparse
import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from detloss.anchor_generators import AnchorGenerator
from detloss.assign.iou_matcher import assign_iou
from detloss.losses.retinanet import RetinaNetLoss
from ._common import fmt_mb, fmt_ms, median_time, peak_memory, print_growth, print_table

STRIDES = (8, 16, 32, 64, 128)


def torchvision_or_exit():
    try:
        import torchvision  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "this benchmark runs torchvision's own loss as the peer: run it in the integrations "
            "environment (make bench-peers INT_VENV=...)"
        ) from None
    import torchvision

    return torchvision


def random_targets(batch: int, size: int, num_classes: int, boxes_per_image: int, g: torch.Generator, first_label=0):
    """Boxes of log-uniform sides from 6 px to half the image, anywhere inside it."""
    targets = []
    for _ in range(batch):
        wh = torch.exp(torch.rand(boxes_per_image, 2, generator=g) * math.log(size / 2 / 6)) * 6
        xy = torch.rand(boxes_per_image, 2, generator=g) * (size - wh)
        labels = torch.randint(first_label, num_classes, (boxes_per_image,), generator=g)
        targets.append({"boxes": torch.cat((xy, xy + wh), dim=1), "labels": labels})
    return targets


def make_inputs(batch: int, size: int, num_classes: int, boxes_per_image: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    sizes = [(math.ceil(size / s), math.ceil(size / s)) for s in STRIDES]
    anchors = AnchorGenerator()(sizes, (size, size))
    a = anchors.shape[0]
    heads = [torch.randn(batch, a, num_classes, generator=g) - 2.0, torch.randn(batch, a, 4, generator=g) * 0.2]
    # torchvision's anchor generator hands every image its own (equal) tensor
    return [anchors.clone() for _ in range(batch)], heads, random_targets(batch, size, num_classes, boxes_per_image, g)


def torchvision_retinanet(num_classes: int):
    """A torchvision RetinaNet whose compute_loss is the peer (its tiny backbone never runs)."""
    tv = torchvision_or_exit()

    class Stub(torch.nn.Module):
        out_channels = 8

    return tv.models.detection.retinanet.RetinaNet(Stub(), num_classes=num_classes)


def check_equal(ours_out, peer_losses, peer_matched, rel=1e-4) -> None:
    for name, key in (("cls", "classification"), ("box", "bbox_regression")):
        a, b = float(ours_out.components[name]), float(peer_losses[key])
        if not math.isclose(a, b, rel_tol=rel, abs_tol=1e-7):
            raise RuntimeError(f"{name}: detloss {a} and torchvision {b} disagree")
    for i, (m, p) in enumerate(zip(ours_out.stats["matched_idxs"], peer_matched)):
        if not torch.equal(m, p):
            raise RuntimeError(f"matched_idxs of image {i}: detloss and torchvision disagree at {int((m != p).sum())} anchors")


def _fwd_bwd(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        fn().backward()

    return run


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=800, help="padded square side in pixels (640 px images at min_size 800)")
    ap.add_argument("--classes", type=int, default=91)
    ap.add_argument("--boxes", type=int, nargs="+", default=[10, 500], help="boxes per image")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    ap.add_argument("--peers", action="store_true", help="accepted for `run.py all --peers`: the peer is always torchvision")


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="bench retinanet", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.batch, args.size, args.classes, args.boxes, args.repeats = 2, 128, 4, [3, 20], 1
    tv = torchvision_or_exit()
    peer_model = torchvision_retinanet(args.classes)
    loss_fn = RetinaNetLoss(args.classes)
    rows: List[List[object]] = []
    results: Dict[str, Dict[int, Tuple[float, int, float, int]]] = {"detloss": {}, "torchvision": {}}
    num_anchors = 0
    for nb in args.boxes:
        anchors, heads, targets = make_inputs(args.batch, args.size, args.classes, nb)
        num_anchors = anchors[0].shape[0]
        leaves = [h.clone().requires_grad_() for h in heads]

        def ours():
            return loss_fn(leaves[0], leaves[1], anchors, targets).total

        def peer():
            out = peer_model.compute_loss(targets, {"cls_logits": leaves[0], "bbox_regression": leaves[1]}, anchors)
            return out["classification"] + out["bbox_regression"]

        def peer_match():
            return [peer_model.proposal_matcher(tv.ops.box_iou(t["boxes"], a)) for t, a in zip(targets, anchors)]

        def ours_match():
            return assign_iou(targets, anchors)

        with torch.no_grad():
            peer_losses = peer_model.compute_loss(targets, {"cls_logits": heads[0], "bbox_regression": heads[1]}, anchors)
            check_equal(loss_fn(heads[0], heads[1], anchors, targets), peer_losses, peer_match())
        num_pos = ours_match().num_pos
        for label, fn, match in (("detloss", ours, ours_match), ("torchvision", peer, peer_match)):
            t = median_time(_fwd_bwd(fn), repeats=args.repeats, warmup=1)
            m = peak_memory(_fwd_bwd(fn))
            ta = median_time(match, repeats=args.repeats, warmup=0)
            ma = peak_memory(match)
            results[label][nb] = (t, m, ta, ma)
        for label in results:
            t, m, ta, ma = results[label][nb]
            bt, bm, bta, bma = results["torchvision"][nb]
            rows.append([nb, num_pos, label, fmt_ms(t), fmt_mb(m), f"{t / bt:.3f}x", f"{m / bm:.3f}x",
                         fmt_ms(ta), fmt_mb(ma), f"{ta / bta:.3f}x"])
    print(f"\nRetinaNet loss forward + backward: batch {args.batch}, {args.size}x{args.size} "
          f"({num_anchors} anchors/image), {args.classes} classes, float32, {torch.get_num_threads()} threads; "
          f"peer: torchvision {tv.__version__} RetinaNet.compute_loss")
    print_table(
        ["boxes/img", "positives", "method", "fwd+bwd", "peak mem", "time/tv", "mem/tv", "matching",
         "match mem", "match/tv"],
        rows,
    )
    print_growth(results, min(args.boxes), max(args.boxes), what="matching")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
