"""Benchmark: the YOLO26 detect loss, detloss's drop-in criterion
(:class:`detloss.integrations.ultralytics.DetectionLoss`: the ``E2ELoss`` form, reg_max 1 L1 boxes)
against ultralytics' own (``model.init_criterion()``: ``E2ELoss(v8DetectionLoss)``, ultralytics
8.4.190), in the same process on the same inputs.

Both criteria are built from one real ``yolo26n.yaml`` model (``--classes`` classes; ``--cfg
yolov8n.yaml`` for the single-head DFL criterion) and called as the trainer calls them:
``loss, items = crit(preds, batch)``, the total ``loss.sum()`` backpropagated, on synthetic float32
head outputs shaped as the head emits them in training (one-to-many and one-to-one ``boxes
[B, 4, A]``, ``scores [B, nc, A]``, ``feats``) and a batch of boxes of random size (2% to 30% of the
image side). Before timing, the totals, the items and the gradients of every head output are
checked equal (the shared harness, :func:`detloss_bench._common.run_suite`), then fwd and fwd+bwd
times (alternating between the two) and peak resident memory are printed with the ratios
ultralytics / detloss. Without ultralytics, detloss's criterion is built from a stand-in model
(:mod:`detloss_bench._ultralytics`) and its own figures are printed.

Run: ``python benchmarks/run.py yolo26`` in the integrations environment (``make bench-peers``;
``--quick`` for tiny sizes, ``--peers`` to require ultralytics).
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ._common import add_detector_arguments, apply_quick
from ._ultralytics import run_criterion_suite


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_detector_arguments(parser, boxes=(8, 100))
    parser.add_argument("--cfg", default="yolo26n.yaml", help="ultralytics model YAML; its head decides the criterion "
                                                              "(default yolo26n.yaml)")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss.integrations.ultralytics import DetectionLoss

    ap = argparse.ArgumentParser(prog="benchmarks/run.py yolo26", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    apply_quick(args)
    return run_criterion_suite("yolo26", args, args.cfg, "detect", DetectionLoss, args.classes)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
