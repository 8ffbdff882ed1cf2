"""Timing and memory measurement shared by the benchmark suites."""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from typing import Callable, Dict, Iterator, List, Sequence

import torch
from torch.profiler import ProfilerActivity, profile


def median_time(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time in seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times: List[float] = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs a line at every start and stop)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def interleaved_median_times(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """Median wall time of each function, their runs interleaved (one warm-up each, then
    ``repeats`` rounds of one run of each), so that a change of machine load between two
    functions' runs does not show up as a ratio."""
    for f in fns.values():
        f()
    times: Dict[str, List[float]] = {w: [] for w in fns}
    for _ in range(repeats):
        for w, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[w].append(time.perf_counter() - t0)
    return {w: statistics.median(v) for w, v in times.items()}


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated by torch on the CPU during ``fn()`` beyond what was live before it.

    Measured with the profiler's allocation events: the running sum of allocations and frees
    in event order, its maximum. Tensors that exist before the call (the inputs) do not count.
    """
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        fn()
    events = []
    for e in prof.profiler.kineto_results.events():  # type: ignore[union-attr]
        if e.name() == "[memory]":
            events.append((e.start_ns(), e.nbytes()))
    events.sort(key=lambda x: x[0])
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:9.2f} ms"


def fmt_mb(nbytes: float) -> str:
    return f"{nbytes / 2**20:9.1f} MB"


def print_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """Print a plain fixed-width table."""
    cols = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cols) for i in range(len(header))]
    for j, r in enumerate(cols):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def add_detector_arguments(parser) -> None:
    """The options of the detector-loss suites: batch size, image side, classes, boxes per image,
    repeats, threads and ``--quick``."""
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--size", type=int, default=640, help="image side in pixels (square)")
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--boxes", type=int, nargs="+", default=[8, 100], help="targets per image")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")


def apply_detector_arguments(args, quick_boxes: int) -> None:
    """``--quick``: batch 2, 64 px, 4 classes, ``quick_boxes`` boxes, one repeat; ``--threads``."""
    if args.quick:
        args.batch_size, args.size, args.classes, args.boxes, args.repeats = 2, 64, 4, [quick_boxes], 1
    if args.threads:
        torch.set_num_threads(args.threads)
