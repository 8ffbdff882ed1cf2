"""Benchmarks: each suite measures detloss against its peer, run in the same process.

Run ``python benchmarks/run.py SUITE|all [options]`` (``make bench``; ``make bench-peers`` in the
environment with the peers, which passes ``--peers``). A suite is a module of this package with
``add_arguments(parser)`` or its own parser, and ``main(argv) -> int``; adding one means adding
its name to :data:`SUITES`. Detector-loss suites build on :mod:`detloss_bench._common`
(:func:`~detloss_bench._common.run_suite`): the peer is imported and built once, the values and
gradients of both are checked equal before anything is timed, then fwd and fwd+bwd times
(alternating between the two) and peak memory are printed with the ratios and the scaling with
the number of boxes. Without its peer a suite prints detloss's own figures and says the peer is
missing; with ``--peers`` a missing peer is an error.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List

SUITES = ("kernels", "yolov5", "yolov3", "fcos", "yolov8", "yolo26", "ultralytics_tasks", "retinanet", "ssd", "detr")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("suite", choices=SUITES + ("all",), help="which benchmark suite to run")
    parser.add_argument("rest", nargs=argparse.REMAINDER,
                        help="options passed on to the suite (--peers: require the real peers)")


def _takes(module, option: str) -> bool:
    """Whether ``module``'s suite accepts ``option`` (its ``add_arguments`` or the parser its
    ``main`` builds from it); suites that do not declare their options get everything."""
    add = getattr(module, "add_arguments", None)
    if add is None:
        return True
    probe = argparse.ArgumentParser(add_help=False)
    add(probe)
    return option in probe._option_string_actions


def run(args: argparse.Namespace) -> int:
    suites: List[str] = list(SUITES) if args.suite == "all" else [args.suite]
    worst = 0
    for s in suites:
        module = importlib.import_module(f"detloss_bench.{s}")
        argv = list(args.rest)
        if "--peers" in argv and not _takes(module, "--peers"):
            argv.remove("--peers")
            print(f"note: suite {s} takes no --peers option; run without it")
        code = int(module.main(argv) or 0)
        if code:
            print(f"suite {s} exited with status {code}", file=sys.stderr)
        worst = max(worst, code)
        sys.stdout.flush()
    return worst
