"""Benchmark: :class:`detloss.YOLOv3Loss` (darknet flavor), forward + backward time and peak memory.

Baseline: the same loss with the ignore pass written the straightforward way, one Python
iteration per truth (each truth against every prediction of its image, keeping a running best),
as darknet's C loop does. It is defined here, swapped in for the vectorized pass only while the
baseline runs; the library never uses it. Both give the same loss (checked before timing).
The pytorch-yolov3 flavor is timed on the same inputs for reference.

Run: ``python benchmarks/bench_yolov3.py`` or ``detloss bench yolov3`` (``--quick`` for tiny sizes).
"""
from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence, Tuple
from unittest import mock

import torch

from detloss.assign import darknet as darknet_assign
from detloss.losses.yolov3 import YOLOV3_MASKS, YOLOv3Loss
from ._common import fmt_mb, fmt_ms, median_time, peak_memory, print_table


def loop_best_truth_iou(pred: torch.Tensor, truth: torch.Tensor, valid: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Baseline ignore pass: a Python loop over images and truths (same result as the library's)."""
    b, p, _ = pred.shape
    best = pred.new_zeros((b, p))
    slot = torch.zeros((b, p), dtype=torch.long, device=pred.device)
    for i in range(b):
        for t in range(int(valid[i].sum())):
            iou = darknet_assign.darknet_iou(pred[i], truth[i, t])
            better = iou > best[i]
            best[i] = torch.where(better, iou, best[i])
            slot[i][better] = t
    return best, slot


def make_inputs(bs: int, img: int, nc: int, per_image: int, seed: int = 0):
    """Random raw layer inputs (stride 32, 16, 8) and ``per_image`` random truths per image."""
    g = torch.Generator().manual_seed(seed)
    inputs = [(0.5 * torch.randn(bs, 3 * (5 + nc), img // s, img // s, generator=g)).requires_grad_()
              for s in (32, 16, 8)]
    n = bs * per_image
    wh = 0.02 + 0.5 * torch.rand(n, 2, generator=g)
    cxcy = wh / 2 + (1 - wh) * torch.rand(n, 2, generator=g)
    img_idx = torch.arange(bs).repeat_interleave(per_image).float()
    cls = torch.randint(0, nc, (n,), generator=g).float()
    targets = torch.cat((img_idx[:, None], cls[:, None], cxcy, wh), 1)
    return inputs, targets


def _step(loss_fn: YOLOv3Loss, inputs, targets) -> Callable[[], object]:
    def run():
        total = loss_fn(inputs, targets).total
        return torch.autograd.grad(total, inputs)

    return run


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="detloss bench yolov3", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    ap.add_argument("--bs", type=int, default=16)
    ap.add_argument("--img", type=int, default=416)
    ap.add_argument("--nc", type=int, default=80)
    ap.add_argument("--targets", type=int, nargs="+", default=[8, 100], help="truths per image")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args(list(argv) if argv is not None else None)
    if args.quick:
        args.bs, args.img, args.nc, args.targets, args.repeats = 2, 64, 3, [2, 5], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"YOLOv3Loss fwd+bwd: batch {args.bs}, {args.img}x{args.img}, {args.nc} classes, "
          f"layers {YOLOV3_MASKS}, {torch.get_num_threads()} threads, median of {args.repeats}")
    darknet = YOLOv3Loss(args.nc, img_size=args.img)
    pv3 = YOLOv3Loss(args.nc, img_size=args.img, flavor="pytorch-yolov3")
    rows = []
    for per_image in args.targets:
        inputs, targets = make_inputs(args.bs, args.img, args.nc, per_image)
        fast = _step(darknet, inputs, targets)
        with torch.no_grad():
            want = darknet(inputs, targets).total
            with mock.patch.object(darknet_assign, "_best_truth_iou", loop_best_truth_iou):
                got = darknet(inputs, targets).total
        if not torch.allclose(want, got, rtol=1e-6):
            raise RuntimeError(f"baseline and library disagree: {float(got)} vs {float(want)}")
        with mock.patch.object(darknet_assign, "_best_truth_iou", loop_best_truth_iou):
            t_base = median_time(fast, args.repeats, warmup=1)
            m_base = peak_memory(fast)
        t_fast = median_time(fast, args.repeats, warmup=1)
        m_fast = peak_memory(fast)
        t_pv3 = median_time(_step(pv3, inputs, targets), args.repeats, warmup=1)
        m_pv3 = peak_memory(_step(pv3, inputs, targets))
        rows += [
            (per_image, "darknet, per-truth loop ignore (baseline)", fmt_ms(t_base), fmt_mb(m_base), "1.00x", "1.00x"),
            (per_image, "darknet, detloss (vectorized)", fmt_ms(t_fast), fmt_mb(m_fast),
             f"{t_base / t_fast:.2f}x", f"{m_base / max(m_fast, 1):.2f}x"),
            (per_image, "pytorch-yolov3, detloss", fmt_ms(t_pv3), fmt_mb(m_pv3),
             f"{t_base / t_pv3:.2f}x", f"{m_base / max(m_pv3, 1):.2f}x"),
        ]
    print_table(("truths/img", "variant", "time", "peak mem", "speed-up", "mem ratio"), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
