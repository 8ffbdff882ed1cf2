"""Benchmark: the dense and box losses of :mod:`detloss.functional` (fused and plain paths) against
the real peers, in the same process.

For each loss it times the forward and the forward+backward (median of ``--repeats`` after
warm-up, the fused, plain and peer calls run in turn, one of each per round;
``torch.set_num_threads(--threads)``, float32) and measures the peak extra memory of
forward+backward, through the public functions of :mod:`detloss.functional` (validation included):

* **fused**: the compiled pass (what detloss runs for large inputs that require grad);
* **plain**: the same call with ``DETLOSS_FUSED=0`` (what it runs for small inputs, without a
  compiler, for targets that require grad, under ``torch.func.grad``);
* **peer**, the original's own code where it can be imported: ``torchvision.ops.sigmoid_focal_loss``,
  ``generalized_box_iou_loss``, ``distance_box_iou_loss``, ``complete_box_iou_loss`` (torchvision);
  PyTorch's ``binary_cross_entropy_with_logits``; ultralytics' ``VarifocalLoss`` and ``bbox_iou``
  (CIoU); with ``--yolov5``, YOLOv5 v7.0's ``BCEBlurWithLogitsLoss`` and ``QFocalLoss`` (its
  package takes about a minute to import). The values are checked equal first.

It also prints the memory-bandwidth bound measured on the spot (one read of the inputs and one write
of a gradient-sized tensor into preallocated memory) and each configuration's first-call cost
(compilation; Inductor's on-disk cache makes it smaller in later processes). Run:
``python benchmarks/run.py kernels`` (``--quick`` for tiny sizes, ``--only dense`` or ``--only box``
for one half, ``--peers`` to fail when torchvision is missing). ``DETLOSS_COMPILE=0`` benchmarks the
plain pass in the "fused" rows too.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF

import detloss.functional as F
from detloss import kernels
from ._common import alternating_medians, fmt_mb, fmt_ms, median_time, peak_memory, print_table

LossFn = Callable[[torch.Tensor], torch.Tensor]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("dense", "box"), default=None,
                        help="run only the dense (logit) losses or only the box losses")
    parser.add_argument("--peers", action="store_true", help="fail unless torchvision (the main peer) imports")
    parser.add_argument("--yolov5", action="store_true",
                        help="also run YOLOv5's BCEBlurWithLogitsLoss and QFocalLoss as peers (slow import)")


# ---------------------------------------------------------------------------------------------
# Peers
# ---------------------------------------------------------------------------------------------


class Peers(NamedTuple):
    torchvision: Optional[object]  # torchvision.ops
    varifocal: Optional[type]  # ultralytics.utils.loss.VarifocalLoss
    bbox_iou: Optional[Callable]  # ultralytics.utils.metrics.bbox_iou
    blur: Optional[type]  # yolov5 utils.loss.BCEBlurWithLogitsLoss
    qfocal: Optional[type]  # yolov5 utils.loss.QFocalLoss


def import_peers(yolov5: bool) -> Peers:
    """The peers' code that this environment has (None for what it lacks)."""
    tv = vfl = biou = blur = qfl = None
    try:
        import torchvision.ops as tv
    except ImportError:
        pass
    try:
        from ultralytics.utils.loss import VarifocalLoss as vfl
        from ultralytics.utils.metrics import bbox_iou as biou
    except ImportError:
        pass
    if yolov5:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from yolov5.utils.loss import BCEBlurWithLogitsLoss as blur
            from yolov5.utils.loss import QFocalLoss as qfl
    return Peers(tv, vfl, biou, blur, qfl)


@contextlib.contextmanager
def environ(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` for the calls inside."""
    saved = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = saved


def plain_path() -> contextlib.AbstractContextManager:
    """``DETLOSS_FUSED=0``: detloss's plain path."""
    return environ(kernels.ENV_FUSED, "0")


class Case(NamedTuple):
    """One loss: detloss's call, the peer's call on the same tensors (None: no peer here) and
    the peer's name."""

    label: str
    detloss: LossFn
    peer: Optional[LossFn]
    peer_name: str


def dense_cases(t: torch.Tensor, q: torch.Tensor, peers: Peers) -> List[Case]:
    """Every dense loss with a detector's setting, in the reduction its peer returns."""
    tv = peers.torchvision
    cases = [
        Case("sigmoid_focal_loss (sum)", lambda x: F.sigmoid_focal_loss(x, t, reduction="sum"),
             None if tv is None else (lambda x: tv.sigmoid_focal_loss(x, t, reduction="sum")),
             "torchvision.ops.sigmoid_focal_loss"),
        Case("bce_with_logits (sum)", lambda x: F.bce_with_logits(x, t, reduction="sum"),
             lambda x: TF.binary_cross_entropy_with_logits(x, t, reduction="sum"),
             "torch binary_cross_entropy_with_logits"),
    ]
    blur = None if peers.blur is None else peers.blur(alpha=0.05)
    cases.append(Case("bce_blur (mean)", lambda x: F.bce_blur(x, t), blur, "yolov5 BCEBlurWithLogitsLoss"))
    qfl = None if peers.qfocal is None else peers.qfocal(torch.nn.BCEWithLogitsLoss(reduction="sum"), 1.5, 0.25)
    cases.append(Case("quality_focal_loss (sum, yolov5)",
                      lambda x: F.quality_focal_loss(x, q, gamma=1.5, alpha=0.25, reduction="sum"),
                      None if qfl is None else (lambda x: qfl(x, q)), "yolov5 QFocalLoss"))
    vfl = None if peers.varifocal is None else peers.varifocal()
    vfl_dims = tuple(range(1, t.dim()))  # ultralytics: mean over the anchor dimension, then sum
    cases.append(Case("varifocal_loss (ultralytics)",
                      lambda x: F.varifocal_loss(x, q, t, reduction="none").mean(vfl_dims[:1]).sum(),
                      None if vfl is None else (lambda x: vfl(x, q, t)), "ultralytics VarifocalLoss"))
    return cases


def box_cases(target: torch.Tensor, peers: Peers) -> List[Case]:
    tv, biou = peers.torchvision, peers.bbox_iou
    cases = []
    for kind, peer in (("giou", "generalized_box_iou_loss"), ("diou", "distance_box_iou_loss"),
                       ("ciou", "complete_box_iou_loss")):
        fn = None if tv is None else getattr(tv, peer)
        cases.append(Case(f"iou_loss {kind} torchvision (sum)",
                          lambda p, k=kind: F.iou_loss(p, target, kind=k, reduction="sum"),
                          None if fn is None else (lambda p, f=fn: f(p, target, reduction="sum")),
                          f"torchvision.ops.{peer}"))
    cases.append(Case("iou_loss ciou yolov5 (sum)",
                      lambda p: F.iou_loss(p, target, kind="ciou", convention="yolov5", reduction="sum"),
                      None if biou is None else (lambda p: (1 - biou(p, target, xywh=False, CIoU=True)).sum()),
                      "ultralytics bbox_iou(CIoU=True)"))
    return cases


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _dense_inputs(shape: Sequence[int], seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3
    score = torch.rand(*shape, generator=g)
    label = (torch.rand(*shape, generator=g) > 0.99).float()  # ~1% positives, as a detector sees
    return x, label, score * label


def _box_inputs(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 600
    target = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 100 + 4], 1)
    pred = target + torch.randn(n, 4, generator=g) * 8
    pred[:, 2:] = torch.maximum(pred[:, 2:], pred[:, :2] + 1)
    return pred, target


class Measure(NamedTuple):
    repeats: int
    warmup: int

    def all(self, fns: Sequence[LossFn], x: torch.Tensor) -> List["Timing"]:
        """fwd and fwd+bwd medians of every ``fns`` on ``x``, the functions run in turn (one of
        each per round, :func:`alternating_medians`: a change in the machine's load affects all
        of them alike), and the peak memory of each fwd+bwd."""
        def fwd(fn: LossFn) -> Callable[[], object]:
            return lambda: fn(x)

        def fwd_bwd(fn: LossFn) -> Callable[[], None]:
            def run() -> None:
                fn(x).backward()
                x.grad = None

            return run

        f = alternating_medians([fwd(fn) for fn in fns], self.repeats, self.warmup)
        fb = alternating_medians([fwd_bwd(fn) for fn in fns], self.repeats, self.warmup)
        return [Timing(a, b, peak_memory(fwd_bwd(fn))) for fn, a, b in zip(fns, f, fb)]


class Timing(NamedTuple):
    fwd: float
    fwd_bwd: float
    mem: int


def _plain(fn: LossFn) -> LossFn:
    """``fn`` on detloss's plain path (``DETLOSS_FUSED=0`` around each call)."""
    def run(x: torch.Tensor) -> torch.Tensor:
        with plain_path():
            return fn(x)

    return run


def _first_call(fn: LossFn, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    fn(x).backward()
    x.grad = None
    return time.perf_counter() - t0


def check_equal(label: str, ours: LossFn, peer: LossFn, x: torch.Tensor) -> None:
    """The value and the gradient of detloss equal the peer's (float32 rounding) before timing."""
    a, b = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
    la, lb = ours(a), peer(b)
    la.backward()
    lb.backward()
    try:
        torch.testing.assert_close(la.detach(), lb.detach().to(la.dtype), rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(a.grad, b.grad.to(a.grad.dtype), rtol=1e-3, atol=1e-5)
    except AssertionError as e:
        raise SystemExit(f"{label}: detloss and its peer disagree, not timing it:\n{e}") from None


def _bound(a: torch.Tensor, b: torch.Tensor, m: Measure) -> float:
    """One read of ``a`` and ``b`` and one write of a gradient-sized tensor into preallocated memory."""
    buf = torch.empty_like(a)
    return median_time(lambda: torch.add(a, b, out=buf), m.repeats, m.warmup)


def _x(r: Optional[float]) -> str:
    return "" if r is None else f"{r:6.2f}x"


def _ratio(a: float, b: Optional[float]) -> Optional[float]:
    return None if b is None or b == 0 else a / b


def run_cases(
    cases: List[Case], x0: torch.Tensor, shape_s: str, m: Measure, fused: bool, first_calls: Dict[str, float],
    timing_rows: List[List[object]], ratio_rows: List[List[object]], native: Optional[Timing] = None,
) -> None:
    """Time every case on ``x0`` (``fused``: the fused and the plain path; else the plain one)."""
    x = x0.clone().requires_grad_()
    for case in cases:
        peer = None
        if case.peer is not None:
            check_equal(case.label, case.detloss, case.peer, x0)
        if fused and case.label not in first_calls:
            first_calls[case.label] = _first_call(case.detloss, x)
        fns = ([case.detloss] if fused else []) + [_plain(case.detloss)] + ([case.peer] if case.peer else [])
        timings = m.all(fns, x)
        if fused:
            ours = timings.pop(0)
            timing_rows.append([case.label, shape_s, "detloss fused", fmt_ms(ours.fwd), fmt_ms(ours.fwd_bwd),
                                fmt_mb(ours.mem)])
        plain = timings.pop(0)
        if case.peer is not None:
            peer = timings.pop(0)
        timing_rows.append([case.label, shape_s, "detloss plain", fmt_ms(plain.fwd), fmt_ms(plain.fwd_bwd),
                            fmt_mb(plain.mem)])
        if peer is not None:
            timing_rows.append([case.label, shape_s, case.peer_name, fmt_ms(peer.fwd), fmt_ms(peer.fwd_bwd),
                                fmt_mb(peer.mem)])
        p_fb = None if peer is None else peer.fwd_bwd
        row = [case.label, shape_s]
        if fused:
            row += [_x(_ratio(ours.fwd, None if peer is None else peer.fwd)), _x(_ratio(ours.fwd_bwd, p_fb)),
                    _x(_ratio(plain.fwd_bwd, ours.fwd_bwd)),
                    _x(_ratio(ours.fwd_bwd, None if native is None else native.fwd_bwd)),
                    _x(_ratio(ours.mem, None if peer is None else peer.mem))]
        else:
            row += ["", "", "", "", ""]
        row += [_x(_ratio(plain.fwd, None if peer is None else peer.fwd)), _x(_ratio(plain.fwd_bwd, p_fb)),
                _x(_ratio(plain.mem, None if peer is None else peer.mem)),
                f"{first_calls[case.label]:5.2f} s" if fused else "",
                "" if peer is not None else "(no peer here)"]
        ratio_rows.append(row)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py kernels", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(args.threads)
    peers = import_peers(args.yolov5)
    if args.peers and peers.torchvision is None:
        raise SystemExit("--peers: torchvision is not importable here (run in the environment of make venv-int)")
    if args.quick:
        dense_fused: List[Tuple[int, ...]] = [(2000, 80), (2, 1000, 80)]
        dense_plain: List[Tuple[int, ...]] = [(300, 80)]
        boxes_fused, boxes_plain = [2000], [200]
    else:
        dense_fused, dense_plain = [(160000, 80), (2, 100000, 80)], [(3000, 80)]
        boxes_fused, boxes_plain = [200000], [2000]
    m = Measure(args.repeats, args.warmup)
    print(f"detloss kernels benchmark: {torch.get_num_threads()} threads, float32, median of {args.repeats} "
          f"after {args.warmup} warm-up; fused pass "
          f"{'compiled (torch.compile dynamic=True)' if kernels.compile_enabled() else 'plain (DETLOSS_COMPILE=0)'}; "
          f"torch {torch.__version__}; peers: "
          + ", ".join(n for n, p in zip(Peers._fields, peers) if p is not None) or "none importable")
    with environ(kernels.ENV_MIN_NUMEL, "0"):  # the fused rows: the compiled pass at every size
        timing_rows: List[List[object]] = []
        ratio_rows: List[List[object]] = []
        first_calls: Dict[str, float] = {}
        if args.only != "box":
            for si, shape in enumerate(dense_fused + dense_plain):
                fused = shape in dense_fused
                x0, t, q = _dense_inputs(shape, args.seed + si)
                shape_s = "x".join(map(str, shape))
                native = None
                if fused:
                    x = x0.clone().requires_grad_()
                    native = m.all([lambda a: TF.binary_cross_entropy_with_logits(a, t, reduction="sum")], x)[0]
                    bound = _bound(x0, t, m)
                    timing_rows.append(["bandwidth bound", shape_s, "read x, t; write g", "", fmt_ms(bound), ""])
                run_cases(dense_cases(t, q, peers), x0, shape_s, m, fused, first_calls, timing_rows, ratio_rows,
                          native)
        if args.only != "dense":
            for n in boxes_fused + boxes_plain:
                pred0, target = _box_inputs(n, args.seed)
                shape_s = f"{n} pairs"
                if n in boxes_fused:
                    bound = _bound(pred0, target, m)
                    timing_rows.append(["bandwidth bound", shape_s, "read p, t; write g", "", fmt_ms(bound), ""])
                run_cases(box_cases(target, peers), pred0, shape_s, m, n in boxes_fused, first_calls, timing_rows,
                          ratio_rows)

    print("\nTimes (fwd: the loss call on an input that requires grad; fwd+bwd: loss.backward() too) "
          "and peak extra memory of fwd+bwd")
    print_table(["loss", "shape", "impl", "fwd", "fwd+bwd", "peak mem"], timing_rows)
    print("\nRatios (detloss / peer, lower is better; speedup = plain / fused; vs native = fused / PyTorch's "
          "BCE-with-logits on the same logits)")
    print_table(
        ["loss", "shape", "fused fwd", "fused fwd+bwd", "speedup", "vs native", "fused mem", "plain fwd",
         "plain fwd+bwd", "plain mem", "first call", ""],
        ratio_rows,
    )
    return 0
