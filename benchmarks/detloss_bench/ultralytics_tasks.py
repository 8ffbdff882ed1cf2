"""Benchmark: the OBB, pose and segmentation losses, detloss's drop-in criteria
(:class:`detloss.integrations.ultralytics.OBBLoss`, ``PoseLoss``, ``SegmentationLoss``) against
ultralytics' own (``model.init_criterion()``, ultralytics 8.4.190), in the same process on the same
inputs.

For each family and task both criteria are built from one real ultralytics model
(``yolo26n-{obb,pose,seg}.yaml``: the end-to-end YOLO26 forms ``E2ELoss(v8OBBLoss)``,
``E2ELoss(PoseLoss26)`` with the head's RealNVP, ``E2ELoss(SegmentLoss26)``; ``yolov8n-*.yaml``:
``v8OBBLoss``, ``v8PoseLoss``, ``v8SegmentationLoss``) and called as the trainer calls them:
``loss, items = crit(preds, batch)``, the total ``loss.sum()`` backpropagated, on synthetic float32
head outputs shaped as the heads emit them in training and a batch of targets of random size (2% to
30% of the image side; OBB: random angles; pose: 17 COCO keypoints inside the box, a third
invisible, 1 class; segmentation: each object's mask its box, as ``overlap_mask`` index maps at 1/4
of the image). Before timing, the totals, the items and the gradients (of every head output, and of
the flow's parameters) are checked equal (the shared harness,
:func:`detloss_bench._common.run_suite`); then fwd and fwd+bwd times (alternating between the two)
and peak resident memory are printed with the ratios ultralytics / detloss, one table per model.
Without ultralytics, detloss's criteria are built from stand-in models
(:mod:`detloss_bench._ultralytics`) and their own figures are printed.

Run: ``python benchmarks/run.py ultralytics_tasks`` in the integrations environment (``make
bench-peers``; ``--quick`` for tiny sizes, ``--tasks``, ``--families``, ``--peers`` to require
ultralytics).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

from ._common import add_detector_arguments, apply_quick
from ._ultralytics import run_criterion_suite

TASKS = ("obb", "pose", "segment")
FAMILIES = ("yolo26", "yolov8")
YAML = {"obb": "{f}n-obb.yaml", "pose": "{f}n-pose.yaml", "segment": "{f}n-seg.yaml"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_detector_arguments(parser, boxes=(8, 100))
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), help="default: all three")
    parser.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), help="default: both")


def main(argv: Optional[Sequence[str]] = None) -> int:
    from detloss.integrations import ultralytics as du

    ap = argparse.ArgumentParser(prog="benchmarks/run.py ultralytics_tasks", description=__doc__.splitlines()[0])
    add_arguments(ap)
    args = ap.parse_args(list(argv) if argv is not None else None)
    apply_quick(args)
    crits = {"obb": du.OBBLoss, "pose": du.PoseLoss, "segment": du.SegmentationLoss}
    json_path = args.json
    worst = 0
    for family in args.families:
        for task in args.tasks:
            if json_path:  # one file per model: NAME.yolo26_pose.json, ...
                p = Path(json_path)
                args.json = str(p.with_name(f"{p.stem}.{family}_{task}{p.suffix}"))
            nc = 1 if task == "pose" else args.classes  # pose models: one class (person)
            code = run_criterion_suite(f"ultralytics_tasks {family} {task}", args, YAML[task].format(f=family), task,
                                       crits[task], nc)
            worst = max(worst, code)
            if code == 2:  # --peers and no ultralytics: said once
                return code
    return worst


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
