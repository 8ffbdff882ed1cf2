"""The command line glue: ``detloss explain LOSS --input ... --target ...`` (``add_arguments``,
``run``). An option a new family needs is added here and to ``OPTION_KEYS``."""
from __future__ import annotations

import argparse
import json
import sys

from .api import explain
from .registry import ALIASES, LOSSES

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
    parser.add_argument("--convention", choices=("torchvision", "yolov5"))
    parser.add_argument("--expect", help="a claimed value (or one per element) to check")
    parser.add_argument("--digits", type=int, default=4, help="digits after the point (default 4)")
    parser.add_argument("--json", action="store_true", help="print the explanation as JSON")


OPTION_KEYS = ("reduction", "alpha", "gamma", "beta", "weight", "pos_weight", "label_smoothing", "ignore_index",
                "label", "kind", "box_format", "convention")


def run(args: argparse.Namespace) -> int:
    options = {k: getattr(args, k) for k in OPTION_KEYS if getattr(args, k, None) is not None}
    try:
        e = explain(args.loss, args.input, args.target, **options)
        if args.expect is not None:
            e.check(args.expect)
    except (ValueError, TypeError, NotImplementedError) as exc:
        print(f"detloss explain: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(e.to_dict(), indent=2))
    else:
        print(e.render(digits=args.digits))
    if e.check_result is not None and not e.check_result.holds:
        return 1
    return 0
