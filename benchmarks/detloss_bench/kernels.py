"""Benchmark: the fused single-pass kernels (:mod:`detloss.kernels`) against their baselines.

For each fused loss at detector sizes (160000 x 80 and 2 x 100000 x 80 logits; 200,000 box pairs)
it times the forward and the forward+backward (median of ``--repeats`` after warm-up, with
``torch.set_num_threads(--threads)``) and measures the peak extra memory of forward+backward,
side by side in the same process with

(a) the plain autograd formula, written as torchvision / fvcore / mmdetection write it (the
    ``_<name>_formula`` of :mod:`detloss.functional`, the ground truth of the tests);
(b) PyTorch's native ``binary_cross_entropy_with_logits`` on the same tensor (dense losses);
(c) the memory-bandwidth bound measured on the spot: one read of the inputs and one write of a
    gradient-sized tensor into preallocated memory (``torch.add(x, t, out=buf)``).

It also reports the first-call cost of each configuration (compilation; Inductor's on-disk cache
makes it smaller in later processes). Run: ``python benchmarks/bench_kernels.py`` or
``detloss bench kernels`` (``--quick`` for tiny sizes, ``--only dense`` or ``--only box`` for one
half). ``DETLOSS_COMPILE=0`` benchmarks the eager closed-form pass instead of the compiled one.
"""
from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as TF

from detloss import kernels
from detloss.functional import bce as fbce
from detloss.functional import focal as ffocal
from detloss.functional import iou as fiou
from ._common import fmt_mb, fmt_ms, median_time, peak_memory, print_table

LossFn = Callable[[torch.Tensor], torch.Tensor]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--repeats", type=int, default=10, help="timed runs per measurement (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs before timing")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", choices=("dense", "box"), default=None,
                        help="run only the dense (logit) losses or only the box losses")


def _dense_inputs(shape: Sequence[int], seed: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * 3
    score = torch.rand(*shape, generator=g)
    label = (torch.rand(*shape, generator=g) > 0.99).float()  # ~1% positives, as a detector sees
    return x, label, score * label


def _dense_cases(t: torch.Tensor, q: torch.Tensor) -> List[Tuple[str, str, LossFn, LossFn]]:
    """(loss name, reduction, fused, formula) for every fused dense loss."""
    return [
        ("sigmoid_focal_loss", "sum",
         lambda x: kernels.fused_sigmoid_focal_loss(x, t, 0.25, 2.0, "sum"),
         lambda x: ffocal._sigmoid_focal_loss_formula(x, t, 0.25, 2.0, "sum")),
        ("bce_with_logits", "sum",
         lambda x: kernels.fused_bce_with_logits(x, t, None, None, "sum"),
         lambda x: fbce._bce_with_logits_formula(x, t, None, None, "sum")),
        ("bce_blur", "mean",
         lambda x: kernels.fused_bce_blur(x, t, 0.05, "mean"),
         lambda x: fbce._bce_blur_formula(x, t, 0.05, "mean")),
        ("quality_focal_loss", "sum",
         lambda x: kernels.fused_quality_focal_loss(x, q, 2.0, None, "sum"),
         lambda x: ffocal._quality_focal_loss_formula(x, q, 2.0, None, "sum")),
        ("varifocal_loss", "sum",
         lambda x: kernels.fused_varifocal_loss(x, q, t, 0.75, 2.0, "sum"),
         lambda x: ffocal._varifocal_loss_formula(x, q, t, 0.75, 2.0, "sum")),
    ]


def _box_inputs(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 600
    target = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 100 + 4], 1)
    pred = target + torch.randn(n, 4, generator=g) * 8
    pred[:, 2:] = torch.maximum(pred[:, 2:], pred[:, :2] + 1)
    return pred, target


class _Measure:
    def __init__(self, repeats: int, warmup: int) -> None:
        self.repeats, self.warmup = repeats, warmup

    def fwd(self, fn: LossFn, x: torch.Tensor) -> float:
        def run():
            fn(x)

        return median_time(run, self.repeats, self.warmup)

    def fwd_bwd(self, fn: LossFn, x: torch.Tensor) -> Tuple[float, int]:
        def run():
            loss = fn(x)
            if loss.dim():
                loss = loss.sum()
            loss.backward()
            x.grad = None

        t = median_time(run, self.repeats, self.warmup)
        return t, peak_memory(run)


def _first_call(fn: LossFn, x: torch.Tensor) -> float:
    t0 = time.perf_counter()
    loss = fn(x)
    (loss if loss.dim() == 0 else loss.sum()).backward()
    x.grad = None
    return time.perf_counter() - t0


def _bound(inputs: Sequence[torch.Tensor], grad_like: torch.Tensor, m: _Measure) -> float:
    """One read of the inputs and one write of a gradient-sized tensor into preallocated memory."""
    buf = torch.empty_like(grad_like)
    if len(inputs) == 1:
        return median_time(lambda: torch.neg(inputs[0], out=buf), m.repeats, m.warmup)
    a, b = inputs[0], inputs[1]
    if len(inputs) == 2:
        return median_time(lambda: torch.add(a, b, out=buf), m.repeats, m.warmup)
    c = inputs[2]
    return median_time(lambda: torch.addcmul(a, b, c, out=buf), m.repeats, m.warmup)


def _bound_fresh(a: torch.Tensor, b: torch.Tensor, m: _Measure) -> float:
    """The same read and write into a freshly allocated tensor: the bound plus the allocation
    (first-touch page faults of a large buffer), which every loss that returns a new gradient pays."""
    return median_time(lambda: torch.add(a, b), m.repeats, m.warmup)


def _fmt_x(r: float) -> str:
    return f"{r:7.2f}x"


def _fused_vs_formula(
    label: str, shape_s: str, fused: LossFn, formula: LossFn, x: torch.Tensor, m: _Measure, bound: float,
    first_call: float, native_fb: Optional[float] = None,
) -> Tuple[List[List[object]], List[object]]:
    """Time and memory rows of the fused loss and its formula on ``x``, and their ratio row."""
    grad_bytes = x.numel() * x.element_size()
    f_fwd = m.fwd(fused, x)
    f_fb, f_mem = m.fwd_bwd(fused, x)
    p_fwd = m.fwd(formula, x)
    p_fb, p_mem = m.fwd_bwd(formula, x)
    rows: List[List[object]] = [
        [label, shape_s, "fused", fmt_ms(f_fwd), fmt_ms(f_fb), fmt_mb(f_mem)],
        [label, shape_s, "formula", fmt_ms(p_fwd), fmt_ms(p_fb), fmt_mb(p_mem)],
    ]
    ratio: List[object] = [
        label, shape_s, _fmt_x(p_fb / f_fb), "" if native_fb is None else _fmt_x(f_fb / native_fb),
        _fmt_x(f_fb / bound), f"{f_mem / grad_bytes:5.2f}", f"{p_mem / grad_bytes:5.2f}", f"{first_call:6.2f} s",
    ]
    return rows, ratio


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="detloss bench kernels", description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(list(argv) if argv is not None else None)
    torch.set_num_threads(args.threads)
    if args.quick:
        dense_shapes: List[Tuple[int, ...]] = [(2000, 80), (2, 1000, 80)]
        n_boxes = 2000
    else:
        dense_shapes = [(160000, 80), (2, 100000, 80)]
        n_boxes = 200000
    m = _Measure(args.repeats, args.warmup)
    compiling = kernels.compile_enabled()
    print(f"detloss kernels benchmark: {torch.get_num_threads()} threads, float32, "
          f"median of {args.repeats} after {args.warmup} warm-up; fused pass "
          f"{'compiled (torch.compile dynamic=True)' if compiling else 'eager closed form (DETLOSS_COMPILE=0)'}; "
          f"torch {torch.__version__}")

    timing_rows: List[List[object]] = []
    ratio_rows: List[List[object]] = []
    first_calls: Dict[str, float] = {}

    if args.only == "box":
        dense_shapes = []
    for si, shape in enumerate(dense_shapes):
        x0, t, q = _dense_inputs(shape, args.seed + si)
        x = x0.clone().requires_grad_()
        grad_mb = x.numel() * x.element_size()
        bound = _bound([x0, t], x0, m)
        fresh = _bound_fresh(x0, t, m)
        native = lambda a: TF.binary_cross_entropy_with_logits(a, t, reduction="sum")  # noqa: E731
        n_fwd = m.fwd(native, x)
        n_fb, n_mem = m.fwd_bwd(native, x)
        shape_s = "x".join(map(str, shape))
        for name, red, fused, formula in _dense_cases(t, q):
            key = f"{name}/{red}"
            if key not in first_calls:
                first_calls[key] = _first_call(fused, x)
            rows, ratio = _fused_vs_formula(
                f"{name} ({red})", shape_s, fused, formula, x, m, bound, first_calls[key], native_fb=n_fb
            )
            timing_rows += rows
            ratio_rows.append(ratio)
        timing_rows += [
            ["native BCE-with-logits (sum)", shape_s, "torch", fmt_ms(n_fwd), fmt_ms(n_fb), fmt_mb(n_mem)],
            ["bandwidth bound", shape_s, "read x,t write g", "", fmt_ms(bound), ""],
            ["bound + allocating g", shape_s, "torch.add(x, t)", "", fmt_ms(fresh), fmt_mb(grad_mb)],
        ]
        del x, x0, t, q

    if args.only != "dense":
        pred0, target = _box_inputs(n_boxes, args.seed)
        pred = pred0.clone().requires_grad_()
        grad_mb = pred.numel() * pred.element_size()
        bound = _bound([pred0, target], pred0, m)
        fresh = _bound_fresh(pred0, target, m)
        shape_s = f"{n_boxes} pairs"
        for convention, kinds in (("torchvision", ("iou", "giou", "diou", "ciou")), ("yolov5", ("ciou",))):
            for kind in kinds:
                key = f"iou_loss/{kind}/{convention}"
                fused = lambda p, k=kind, c=convention: kernels.fused_iou_loss(p, target, k, "xyxy", c, "sum")  # noqa: E731
                formula = lambda p, k=kind, c=convention: fiou._iou_loss_formula(p, target, k, "xyxy", c, "sum")  # noqa: E731
                first_calls[key] = _first_call(fused, pred)
                rows, ratio = _fused_vs_formula(
                    f"iou_loss {kind} {convention} (sum)", shape_s, fused, formula, pred, m, bound, first_calls[key]
                )
                timing_rows += rows
                ratio_rows.append(ratio)
        timing_rows.append(["bandwidth bound", shape_s, "read p,t write g", "", fmt_ms(bound), ""])
        timing_rows.append(["bound + allocating g", shape_s, "torch.add(p, t)", "", fmt_ms(fresh), fmt_mb(grad_mb)])

    print("\nTimes (fwd: the loss call on an input that requires grad; fwd+bwd: loss.backward() too) "
          "and peak extra memory of fwd+bwd")
    print_table(["loss", "shape", "impl", "fwd", "fwd+bwd", "peak mem"], timing_rows)
    print("\nRatios, fwd+bwd (speedup = formula / fused; vs native and vs bound = fused / other, lower is "
          "better; memory in gradient-sized buffers)")
    print_table(
        ["loss", "shape", "speedup", "vs native", "vs bound", "mem fused", "mem formula", "first call"],
        ratio_rows,
    )
    if os.environ.get("DETLOSS_FUSED", "1") == "0":
        print("note: DETLOSS_FUSED=0 does not affect this benchmark (it calls the kernels directly)")
    return 0
