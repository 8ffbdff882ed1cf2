"""The command line glue: ``detloss explain LOSS --input ... --target ...`` (``add_arguments``,
``run``). An option a new family needs is added here and to ``OPTION_KEYS``."""
from __future__ import annotations

import argparse
import json
import sys

from .api import explain
from .registry import ALIASES, LOSSES
from .steps import formatter

__all__ = ["add_arguments", "run", "OPTION_KEYS"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("loss", help="one of: " + ", ".join(sorted(LOSSES)) + " (aliases: " + ", ".join(sorted(ALIASES)) + ")")
    parser.add_argument("--input", required=True, help="comma-separated numbers; rows separated by ';' (e.g. '1,2;3,4')")
    parser.add_argument("--target", required=True, help="same layout as --input (class indices for cross-entropy)")
    parser.add_argument("--reduction", choices=("none", "mean", "sum"))
    parser.add_argument("--alpha", type=float)
    parser.add_argument("--gamma", type=float)
    parser.add_argument("--beta", type=float)
    parser.add_argument("--weight", help="per-element weight (bce) or per-class weight (cross-entropy)")
    parser.add_argument("--pos-weight", dest="pos_weight")
    parser.add_argument("--label-smoothing", dest="label_smoothing", type=float)
    parser.add_argument("--ignore-index", dest="ignore_index", type=int)
    parser.add_argument("--label", help="varifocal: 0/1 label per element")
    parser.add_argument("--kind", choices=("iou", "giou", "diou", "ciou", "eiou", "siou"))
    parser.add_argument("--box-format", dest="box_format", choices=("xyxy", "cxcywh"))
    parser.add_argument("--convention", choices=("torchvision", "yolov5", "detr", "ultralytics"),
                        help="iou kinds: torchvision | yolov5; matching-cost: detr | ultralytics")
    parser.add_argument("--cost-class", dest="cost_class", type=float, help="matching-cost: class cost weight")
    parser.add_argument("--cost-bbox", dest="cost_bbox", type=float, help="matching-cost: L1 cost weight")
    parser.add_argument("--cost-giou", dest="cost_giou", type=float, help="matching-cost: GIoU cost weight")
    parser.add_argument("--use-focal", dest="use_focal", action="store_const", const=True,
                        help="matching-cost: sigmoid focal class cost (RT-DETR, D-FINE, DEIM)")
    parser.add_argument("--expect", help="a claimed value (or one per element) to check")
    parser.add_argument("--digits", type=int, default=4, help="digits after the point (default 4)")
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON")


OPTION_KEYS = ("reduction", "alpha", "gamma", "beta", "weight", "pos_weight", "label_smoothing", "ignore_index",
                "label", "kind", "box_format", "convention", "cost_class", "cost_bbox", "cost_giou", "use_focal")


def run(args: argparse.Namespace) -> int:
    options = {k: getattr(args, k) for k in OPTION_KEYS if getattr(args, k, None) is not None}
    try:
        formatter(args.digits)  # checks --digits before any work
        e = explain(args.loss, args.input, args.target, **options)
        if args.expect is not None:
            e.check(args.expect)
        text = json.dumps(e.to_dict(), indent=2) if args.json else e.render(digits=args.digits)
    except (ValueError, TypeError, NotImplementedError) as exc:
        print(f"detloss explain: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if e.check_result is not None and not e.check_result.holds:
        return 1
    return 0
