"""Benchmark: :class:`detloss.YOLOv5Loss` against yolov5's own ``ComputeLoss`` (the ``yolov5``
package 7.0.14, the packaged ultralytics/yolov5 v7.0), in the same process on the same inputs.

The peer is built the way yolov5's training builds it, ``ComputeLoss(model)``, from the smallest
model it accepts: a module holding yolov5's own ``Detect`` layer (1 input channel per level; its
anchors, the yolov5s P3-P5 anchors, divided by the strides 8, 16, 32 as ``DetectionModel`` does)
and ``hyp`` = hyp.scratch-low's loss gains, which are also YOLOv5Loss's defaults. Inputs:
synthetic raw head outputs ``[B, 3, H, W, 5 + C]`` per level (float32) and boxes of random size
(1% to 31% of the image side). Before timing, the totals, the three terms and the gradients
w.r.t. the head outputs are checked equal.

Run: ``python benchmarks/run.py yolov5`` (``--quick`` for tiny sizes; ``--peers`` to require the
peer, as ``make bench-peers`` does).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence, Tuple

import torch

from ._common import Side, add_detector_arguments, apply_quick, import_peer, run_suite

PEER = "yolov5 ComputeLoss"
HYP = dict(box=0.05, obj=1.0, cls=0.5, cls_pw=1.0, obj_pw=1.0, anchor_t=4.0, fl_gamma=0.0, label_smoothing=0.0)


def make_inputs(bs: int, img: int, nc: int, per_image: int, seed: int = 0):
    """Random head outputs for strides 8/16/32 and ``per_image`` random targets per image."""
    gen = torch.Generator().manual_seed(seed)
    preds = [torch.randn(bs, 3, img // s, img // s, 5 + nc, generator=gen) for s in (8, 16, 32)]
    n = bs * per_image
    wh = torch.rand(n, 2, generator=gen) * 0.3 + 0.01
    xy = wh / 2 + torch.rand(n, 2, generator=gen) * (1 - wh)
    img_idx = torch.arange(bs, dtype=torch.float32).repeat_interleave(per_image)
    cls = torch.randint(0, nc, (n,), generator=gen).float()
    return preds, torch.cat((img_idx[:, None], cls[:, None], xy, wh), 1)


def build_peer(nc: int):
    """yolov5's ComputeLoss for the default anchors and strides, or PeerMissing."""
    yolo = import_peer("yolov5.models.yolo", "yolov5==7.0.14")
    loss_mod = import_peer("yolov5.utils.loss", "yolov5==7.0.14")
    from detloss.losses.yolov5 import DEFAULT_ANCHORS, DEFAULT_STRIDES

    class SmallestModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            detect = yolo.Detect(nc, [list(a) for a in DEFAULT_ANCHORS], ch=(1,) * len(DEFAULT_ANCHORS))
            detect.stride = torch.tensor([float(s) for s in DEFAULT_STRIDES])
            detect.anchors /= detect.stride.view(-1, 1, 1)  # as DetectionModel.__init__ does
            self.model = torch.nn.ModuleList([detect])
            self.hyp = dict(HYP)

    return loss_mod.ComputeLoss(SmallestModel())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_detector_arguments(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss import YOLOv5Loss

    ap = argparse.ArgumentParser(prog="benchmarks/run.py yolov5", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    apply_quick(args)
    ours_loss = YOLOv5Loss(args.classes)

    def case(nb: int, peer) -> Tuple[Side, Optional[Side]]:
        preds, targets = make_inputs(args.batch, args.size, args.classes, nb)
        leaves = [p.requires_grad_() for p in preds]

        def ours_terms():
            out = ours_loss(leaves, targets)
            return {k: float(out.components[k]) for k in ("box", "obj", "cls")}

        ours = Side("detloss", lambda: ours_loss(leaves, targets).total, leaves, ours_terms)
        if peer is None:
            return ours, None

        def peer_terms():
            items = peer(leaves, targets)[1]
            return dict(zip(("box", "obj", "cls"), items.tolist()))

        return ours, Side(PEER, lambda: peer(leaves, targets)[0], leaves, peer_terms)

    title = (f"YOLOv5 loss: batch {args.batch}, {args.size}x{args.size}, {args.classes} classes, float32, CPU, "
             f"{torch.get_num_threads()} threads, median of {args.repeats}")
    return run_suite("yolov5", args, title, PEER, lambda: build_peer(args.classes), case)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
