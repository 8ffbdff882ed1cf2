"""Benchmark: :class:`detloss.YOLOv8Loss` against ultralytics' own ``v8DetectionLoss``
(ultralytics 8.4.190), in the same process on the same inputs.

The peer is built as ultralytics' ``DetectionModel.init_criterion`` builds it,
``v8DetectionLoss(model)``, from the smallest model it accepts: a module holding ultralytics' own
``Detect`` layer (``nc`` classes, ``reg_max`` 16, 1 input channel per level, strides 8, 16, 32)
and ``args`` with the default gains ``box=7.5, cls=0.5, dfl=1.5`` (YOLOv8Loss's defaults).
Each side gets the head outputs in the layout its own head emits: detloss the per-level maps
``[B, 4 * reg_max + C, H, W]``, ultralytics the concatenated ``boxes [B, 4 * reg_max, A]`` and
``scores [B, C, A]`` of its ``Detect.forward_head`` (same numbers); the batch as the trainer's
dict (``batch_idx``, ``cls``, ``bboxes``). Boxes of random size (2% to 30% of the image side).
Before timing, the totals (``loss.sum()`` of what the peer returns, what its trainer
backpropagates), the three terms and the gradients are checked equal.

Run: ``python benchmarks/run.py yolov8`` (``--quick`` for tiny sizes; ``--peers`` to require the
peer, as ``make bench-peers`` does).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from types import SimpleNamespace
from typing import Optional, Sequence, Tuple

import torch

from ._common import Side, add_detector_arguments, apply_quick, import_peer, run_suite

PEER = "ultralytics v8DetectionLoss"
REG_MAX = 16
STRIDES = (8, 16, 32)


def synthetic(bs: int, size: int, nc: int, boxes: int, reg_max: int = REG_MAX, seed: int = 0):
    """Per-level head outputs for a ``size`` x ``size`` image and ``boxes`` targets per image
    (YOLO rows ``[N, 6]``: image, class, cx, cy, w, h normalized)."""
    g = torch.Generator().manual_seed(seed)
    no = 4 * reg_max + nc
    feats = [torch.randn(bs, no, size // s, size // s, generator=g) for s in STRIDES]
    n = bs * boxes
    wh = torch.rand(n, 2, generator=g) * 0.28 + 0.02
    c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    img = torch.arange(bs).repeat_interleave(boxes).float()
    cls = torch.randint(0, nc, (n,), generator=g).float()
    return feats, torch.cat((img[:, None], cls[:, None], c, wh), 1)


def build_peer(nc: int):
    """ultralytics' v8DetectionLoss for the smallest Detect model, or PeerMissing."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-config-"))
    head = import_peer("ultralytics.nn.modules.head", "ultralytics==8.4.190")
    loss_mod = import_peer("ultralytics.utils.loss", "ultralytics==8.4.190")

    class SmallestModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            detect = head.Detect(nc=nc, reg_max=REG_MAX, ch=(1,) * len(STRIDES))
            detect.stride = torch.tensor([float(s) for s in STRIDES])
            self.model = torch.nn.ModuleList([detect])
            self.args = SimpleNamespace(box=7.5, cls=0.5, dfl=1.5)

    return loss_mod.v8DetectionLoss(SmallestModel())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_detector_arguments(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss import YOLOv8Loss

    ap = argparse.ArgumentParser(prog="benchmarks/run.py yolov8", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    apply_quick(args)
    ours_loss = YOLOv8Loss(args.classes, strides=STRIDES, reg_max=REG_MAX)

    def case(nb: int, peer) -> Tuple[Side, Optional[Side]]:
        feats, targets = synthetic(args.batch, args.size, args.classes, nb)
        leaves = [f.requires_grad_() for f in feats]
        bs, no = args.batch, 4 * REG_MAX + args.classes

        def flat(per_level):  # [B, no, H, W] per level -> [B, no, A]
            return torch.cat([t.reshape(bs, no, -1) for t in per_level], 2)

        def ours_terms():
            out = ours_loss(leaves, targets)
            return {k: float(out.components[k]) for k in ("box", "cls", "dfl")}

        ours = Side("detloss", lambda: ours_loss(leaves, targets).total, leaves, ours_terms,
                    common_grads=lambda g: [flat(g)])
        if peer is None:
            return ours, None
        joined = flat([f.detach() for f in feats])
        boxes = joined[:, : 4 * REG_MAX].clone().requires_grad_()
        scores = joined[:, 4 * REG_MAX:].clone().requires_grad_()
        preds = {"boxes": boxes, "scores": scores, "feats": [f.detach() for f in feats]}
        batch = {"batch_idx": targets[:, 0], "cls": targets[:, 1:2], "bboxes": targets[:, 2:6]}

        def peer_terms():
            items = peer(preds, batch)[1]
            return {k: float(items[n]) for k, n in (("box", "box_loss"), ("cls", "cls_loss"), ("dfl", "dfl_loss"))}

        theirs = Side(PEER, lambda: peer(preds, batch)[0].sum(), [boxes, scores], peer_terms,
                      common_grads=lambda g: [torch.cat(g, 1)])
        return ours, theirs

    title = (f"YOLOv8 loss: batch {args.batch}, {args.size}x{args.size}, {args.classes} classes, reg_max {REG_MAX}, "
             f"float32, CPU, {torch.get_num_threads()} threads, median of {args.repeats}")
    return run_suite("yolov8", args, title, PEER, lambda: build_peer(args.classes), case)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
