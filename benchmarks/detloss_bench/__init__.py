"""Benchmarks: each suite prints a table of ratios against baselines run in the same process.

Suites are modules of this package with ``add_arguments(parser)``/``main(argv)``; ``detloss bench SUITE``
and the scripts in ``benchmarks/`` both run them.
"""
from __future__ import annotations

import argparse
import importlib
from typing import List

SUITES = ("kernels", "yolov5", "yolov3", "fcos", "yolov8", "yolo26", "ultralytics_tasks")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=SUITES + ("all",), help="which benchmark suite to run")
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="options passed on to the suite")


def run(args: argparse.Namespace) -> int:
    suites: List[str] = list(SUITES) if args.suite == "all" else [args.suite]
    for s in suites:
        importlib.import_module(f"detloss_bench.{s}").main(list(args.rest))
    return 0
