"""Timing, memory measurement and the detloss-against-peer harness shared by the benchmark suites."""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

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


def _status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _can_reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _status_kb("VmHWM")
        return True
    except (OSError, KeyError):
        return False


def peak_rss(fn: Callable[[], object]) -> int:
    """Peak resident memory of the process during ``fn()`` beyond its level just before, in bytes.

    Linux: free heap memory is returned first (glibc ``malloc_trim``), the peak resident size
    ``VmHWM`` is reset through ``/proc/self/clear_refs``, and read after the call. It counts every
    allocation (torch's and the peers' Python objects alike) at a constant cost, whatever the
    number of ops, where :func:`peak_memory` keeps a profiler event per op and itself runs out
    of memory on long Python loops. Includes the allocator's slack (typically 10-30 % above the
    allocation peak). Elsewhere: :func:`peak_memory`.
    """
    if not _can_reset_peak_rss():
        return peak_memory(fn)
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kb("VmRSS")
    fn()
    return max(0, _status_kb("VmHWM") - before) * 1024


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


# ----------------------------------------------------------------------------- detloss against a peer
# A detector-loss suite builds, for each number of boxes per image, two :class:`Side` objects
# (detloss and the peer, on the same inputs) and hands them to :func:`compare`, which checks that
# both give the same values and gradients, then times them alternately and measures their peak
# memory. :func:`report` prints the table, the ratios and the scaling with the box count.


class EqualityError(AssertionError):
    """detloss and the peer do not give the same values or gradients: nothing is timed."""


class PeerMissing(RuntimeError):
    """The peer's framework is not installed (or does not import)."""


def import_peer(module: str, install: str):
    """Import the peer's ``module`` or raise :class:`PeerMissing` saying what to install."""
    import importlib
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the peers' own deprecation warnings
            return importlib.import_module(module)
    except Exception as e:  # not installed, or installed but not importable here
        raise PeerMissing(f"{module} does not import here ({type(e).__name__}: {e}); "
                          f"the peer needs {install} (make bench-peers builds that environment)") from None


@dataclass
class Side:
    """One implementation on one input.

    ``loss()`` computes the total (a scalar with its graph to ``leaves``), as a trainer would
    call it, or is None where the implementation defines no loss value; ``gradients()`` (default:
    autograd of ``loss()`` w.r.t. ``leaves``) the gradients, for an implementation that computes
    them itself (darknet computes its deltas in the forward pass); ``terms()`` (optional) the
    named terms as numbers, checked one by one; ``common_grads(grads)`` maps the gradients to the
    layout both sides share (when the two take the same head outputs in different layouts)."""

    label: str
    loss: Optional[Callable[[], torch.Tensor]]
    leaves: Sequence[torch.Tensor]
    terms: Optional[Callable[[], Dict[str, float]]] = None
    common_grads: Callable[[Sequence[torch.Tensor]], Sequence[torch.Tensor]] = lambda g: g
    gradients: Optional[Callable[[], Sequence[torch.Tensor]]] = None

    def raw_grads(self) -> Sequence[torch.Tensor]:
        if self.gradients is not None:
            return self.gradients()
        return torch.autograd.grad(self.loss().sum(), list(self.leaves))

    def grads(self) -> Sequence[torch.Tensor]:
        return self.common_grads(self.raw_grads())


@dataclass
class Measurement:
    fwd_s: float
    fwd_bwd_s: float
    fwd_peak: int
    fwd_bwd_peak: int


@dataclass
class Row:
    """One box count: detloss's measurement, the peer's (None when it is missing) and the check."""

    boxes: int
    ours: Measurement
    peer: Optional[Measurement]
    check: str = ""
    extra: Dict[str, object] = field(default_factory=dict)


def _max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    scale = max(float(b.abs().max()) if b.numel() else 0.0, 1e-30)
    return float((a - b).abs().max()) / scale if a.numel() else 0.0


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run on one intra-op thread, then restore the thread count."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def check_equal(ours: Side, peer: Side, rtol: float = 1e-5, grad_rtol: float = 1e-4) -> str:
    """Raise :class:`EqualityError` unless the totals (relative ``rtol``), the terms and the
    gradients (largest difference relative to the largest gradient entry, ``grad_rtol``) agree;
    returns a one-line summary of the differences.

    The check runs on one thread: a peer's assignment by indexing with repeated indices
    (yolov5's ``tobj[b, a, gj, gi] = iou`` where several targets share a cell) keeps the value
    written last only when the write is serial; with several threads torch's CPU ``index_put_``
    splits the indices and which duplicate wins varies from call to call (seen at batch 16 with
    100 boxes per image). detloss reproduces the serial rule on every device and thread count."""
    with one_thread():
        return _check_equal(ours, peer, rtol, grad_rtol)


def _check_equal(ours: Side, peer: Side, rtol: float, grad_rtol: float) -> str:
    totals = ours.loss is not None and peer.loss is not None
    if totals:
        a, b = float(ours.loss().detach().sum()), float(peer.loss().detach().sum())
        if not math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12):
            raise EqualityError(f"{ours.label} total {a!r} != {peer.label} total {b!r} (rtol {rtol})")
    worst_term = 0.0
    if ours.terms is not None and peer.terms is not None:
        ta, tb = ours.terms(), peer.terms()
        for k in tb:
            if not math.isclose(ta[k], tb[k], rel_tol=rtol, abs_tol=1e-9):
                raise EqualityError(f"term {k}: {ours.label} {ta[k]!r} != {peer.label} {tb[k]!r} (rtol {rtol})")
            worst_term = max(worst_term, abs(ta[k] - tb[k]) / max(abs(tb[k]), 1e-30))
    ga, gb = ours.grads(), peer.grads()
    if len(ga) != len(gb):
        raise EqualityError(f"{len(ga)} gradients from {ours.label}, {len(gb)} from {peer.label}")
    worst_grad = 0.0
    for i, (x, y) in enumerate(zip(ga, gb)):
        if x.shape != y.shape:
            raise EqualityError(f"gradient {i}: shape {tuple(x.shape)} from {ours.label}, {tuple(y.shape)} from {peer.label}")
        d = _max_rel(x, y)
        if not d <= grad_rtol:
            raise EqualityError(f"gradient {i}: {ours.label} and {peer.label} differ by {d:.2e} of the largest entry "
                                f"(tolerance {grad_rtol:.0e})")
        worst_grad = max(worst_grad, d)
    parts = [f"total rel. diff {abs(a - b) / max(abs(b), 1e-30):.1e}"] if totals else []
    if ours.terms is not None and peer.terms is not None:
        parts.append(f"terms {worst_term:.1e}")
    parts.append(f"gradients {worst_grad:.1e} of the largest entry")
    return "equal: " + ", ".join(parts)


def _fwd(side: Side) -> Callable[[], object]:
    return side.loss if side.loss is not None else side.raw_grads


def _fwd_bwd(side: Side) -> Callable[[], object]:
    return side.raw_grads


def alternating_medians(fns: Sequence[Callable[[], object]], repeats: int, warmup: int) -> List[float]:
    """Median wall time of each of ``fns``, run in turn (one of each per round) so that a change
    in the machine's load affects all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def measure(sides: Sequence[Side], repeats: int, warmup: int) -> List[Measurement]:
    """fwd and fwd+bwd median times (alternating between the sides) and peak memory of each side
    (:func:`peak_rss`)."""
    fwd = alternating_medians([_fwd(s) for s in sides], repeats, warmup)
    fwd_bwd = alternating_medians([_fwd_bwd(s) for s in sides], repeats, warmup)
    return [Measurement(f, fb, peak_rss(_fwd(s)), peak_rss(_fwd_bwd(s)))
            for s, f, fb in zip(sides, fwd, fwd_bwd)]


def compare(ours: Side, peer: Optional[Side], boxes: int, repeats: int, warmup: int,
            rtol: float = 1e-5, grad_rtol: float = 1e-4) -> Row:
    """Check ``ours`` against ``peer`` (when there is one), then measure both."""
    check = check_equal(ours, peer, rtol, grad_rtol) if peer is not None else ""
    ms = measure([ours] + ([peer] if peer is not None else []), repeats, warmup)
    return Row(boxes, ms[0], ms[1] if peer is not None else None, check)


def _ratio(peer: float, ours: float) -> str:
    return f"{peer / ours:.2f}x" if ours > 0 else "-"


def report(title: str, peer_label: str, rows: Sequence[Row], missing: Optional[str] = None,
           transcription: bool = False) -> None:
    """Print the comparison: per box count and pass, both times and peak memories and the ratios
    ``peer / detloss`` (above 1: detloss is faster / smaller); then the scaling from the smallest
    to the largest box count; a missing peer is said, and detloss's own figures are printed."""
    print(title)
    if missing:
        print(f"peer missing: {missing}; detloss's own figures only")
    elif transcription:
        print(f"peer: {peer_label} -- a TRANSCRIPTION written for this benchmark (no runnable original exists), "
              "not the original's code")
    else:
        print(f"peer: {peer_label}, the original's own code, run in this process on the same inputs")
    table = []
    for r in rows:
        for name, o, p in (("fwd", r.ours.fwd_s, r.peer and r.peer.fwd_s),
                           ("fwd+bwd", r.ours.fwd_bwd_s, r.peer and r.peer.fwd_bwd_s)):
            om = r.ours.fwd_peak if name == "fwd" else r.ours.fwd_bwd_peak
            pm = None if r.peer is None else (r.peer.fwd_peak if name == "fwd" else r.peer.fwd_bwd_peak)
            table.append([r.boxes, name, fmt_ms(o), "-" if p is None else fmt_ms(p), "-" if p is None else _ratio(p, o),
                          fmt_mb(om), "-" if pm is None else fmt_mb(pm), "-" if pm is None else _ratio(pm, max(om, 1))])
    print_table(["boxes/img", "pass", "detloss", peer_label, "speed-up", "detloss peak", "peer peak", "mem ratio"],
                table)
    print("  (median times; peak: resident memory above the level before the call; ratios peer / detloss)")
    for r in rows:
        if r.check:
            print(f"  {r.boxes} boxes/img: {r.check}")
    if len(rows) > 1:
        lo, hi = rows[0], rows[-1]
        print(f"scaling {lo.boxes} -> {hi.boxes} boxes/img (fwd+bwd time, peak memory):")
        width = max(len("detloss"), len(peer_label))
        for label, a, b in (("detloss", lo.ours, hi.ours), (peer_label, lo.peer, hi.peer)):
            if a is not None and b is not None:
                print(f"  {label:{width}s}  time x{b.fwd_bwd_s / a.fwd_bwd_s:.2f}, "
                      f"peak x{b.fwd_bwd_peak / max(a.fwd_bwd_peak, 1):.2f}")
    print()


def add_detector_arguments(parser: argparse.ArgumentParser, *, batch: int = 16, size: int = 640,
                           classes: int = 80, boxes: Sequence[int] = (8, 100, 300), repeats: int = 5) -> None:
    """The options every detector-loss suite takes (defaults: the sizes the README quotes)."""
    parser.add_argument("--batch", type=int, default=batch, help=f"images per batch (default {batch})")
    parser.add_argument("--size", type=int, default=size, help=f"square image side in pixels (default {size})")
    parser.add_argument("--classes", type=int, default=classes, help=f"number of classes (default {classes})")
    parser.add_argument("--boxes", type=int, nargs="+", default=list(boxes),
                        help="boxes per image, one measurement each (default " + " ".join(map(str, boxes)) + ")")
    parser.add_argument("--repeats", type=int, default=repeats, help=f"timed runs per measurement (median; default {repeats})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before timing (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (smoke test)")
    parser.add_argument("--peers", action="store_true",
                        help="require the peer: its absence is an error (default: detloss's figures alone)")
    parser.add_argument("--json", metavar="FILE", help="also write the measurements to FILE as JSON")


def apply_quick(args: argparse.Namespace, *, size: int = 64, boxes: Sequence[int] = (2, 5)) -> None:
    if args.quick:
        args.batch, args.size, args.classes, args.boxes, args.repeats, args.warmup = 2, size, 4, list(boxes), 1, 0
    torch.set_num_threads(args.threads)


def write_json(path: Optional[str], suite: str, args: argparse.Namespace, peer_label: str, rows: Sequence[Row],
               missing: Optional[str], transcription: bool = False, load: Optional[Tuple[float, float]] = None) -> None:
    if not path:
        return
    import json

    doc = {"suite": suite, "peer": peer_label, "peer_missing": missing, "transcription": transcription,
           "batch": args.batch, "size": args.size, "classes": args.classes, "threads": torch.get_num_threads(),
           "torch": torch.__version__, "load_average": load, "cpu_count": os.cpu_count(),
           "rows": [{"boxes": r.boxes, "check": r.check, "detloss": asdict(r.ours),
                     "peer": None if r.peer is None else asdict(r.peer), **r.extra} for r in rows]}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)


def run_suite(suite: str, args: argparse.Namespace, title: str, peer_label: str,
              build_peer: Callable[[], object], case: Callable[[int, object], Tuple[Side, Optional[Side]]],
              transcription: bool = False) -> int:
    """The common driver: build the peer once (``build_peer``, raising :class:`PeerMissing` when
    its framework is absent), then for each box count ``case(boxes, peer)`` gives the two sides
    (the peer's None when it is missing), which are checked, measured and reported.
    Returns 0, or 1 when the check fails, 2 when ``--peers`` was asked and the peer is missing."""
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    missing = None
    try:
        peer = build_peer()
    except PeerMissing as e:
        if args.peers:
            print(f"{suite}: error: {e}", file=sys.stderr)
            return 2
        peer, missing = None, str(e)
    rows: List[Row] = []
    for nb in args.boxes:
        ours, theirs = case(nb, peer)
        try:
            rows.append(compare(ours, theirs, nb, args.repeats, args.warmup))
        except EqualityError as e:
            print(f"{suite}: error: {nb} boxes/img: the equality check failed, nothing was timed: {e}", file=sys.stderr)
            return 1
    report(title, peer_label, rows, missing, transcription)
    load = None if load_before is None else (load_before, os.getloadavg()[0])
    if load is not None:
        busy = max(load) > torch.get_num_threads() + 0.5  # the suite's own threads count in the load
        print(f"machine load average (1 min) {load[0]:.1f} at the start, {load[1]:.1f} at the end "
              f"({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
              + (": above the thread count, other processes shared the CPU" if busy else "") + "\n")
    write_json(args.json, suite, args, peer_label, rows, missing, transcription, load)
    return 0


def interleaved_median_times(fns: Dict[str, Callable[[], object]], repeats: int) -> Dict[str, float]:
    """:func:`alternating_medians` over named functions (one warm-up run each)."""
    names = list(fns)
    return dict(zip(names, alternating_medians([fns[n] for n in names], repeats, warmup=1)))


def torchvision_anchors(model, batch: int, size: int, feature_sizes: Sequence[Tuple[int, int]]) -> List[torch.Tensor]:
    """The per-image anchors a torchvision detection model's own ``anchor_generator`` hands its
    ``compute_loss`` for ``batch`` square images of side ``size`` and these feature map sizes."""
    from torchvision.models.detection.image_list import ImageList

    images = ImageList(torch.zeros(batch, 3, size, size), [(size, size)] * batch)
    return model.anchor_generator(images, [torch.zeros(batch, 1, h, w) for h, w in feature_sizes])
