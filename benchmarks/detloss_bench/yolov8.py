"""Benchmark: :class:`detloss.YOLOv8Loss` with the candidate-restricted assigner against the same
loss with the assigner computed the reference's dense way (``[B, M, A]`` tensors, as ultralytics'
``TaskAlignedAssigner`` does), in the same process on the same inputs.

Measured: forward + backward time (median) and the peak memory torch allocates during it beyond
the inputs, for the whole loss and for the assignment alone. Synthetic head outputs (float32)
and boxes of random size (2% to 30% of the image side). The results of both ways are checked to
be equal before timing.

Run: ``python benchmarks/bench_yolov8.py`` or ``detloss bench yolov8`` (``--quick`` for tiny sizes).
"""
from __future__ import annotations

import argparse
from typing import List, Optional, Sequence

import torch

from detloss.losses.yolov8 import YOLOv8Loss, decode_distances, make_anchors, preprocess_targets
from ._common import add_detector_arguments, apply_detector_arguments, fmt_mb, fmt_ms, median_time, peak_memory, print_table


def synthetic(bs: int, size: int, nc: int, boxes: int, reg_max: int = 16, seed: int = 0):
    """Head outputs for a ``size`` x ``size`` image and ``boxes`` targets per image."""
    g = torch.Generator().manual_seed(seed)
    no = 4 * reg_max + nc
    feats = [torch.randn(bs, no, size // s, size // s, generator=g) for s in (8, 16, 32)]
    n = bs * boxes
    wh = torch.rand(n, 2, generator=g) * 0.28 + 0.02
    c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    img = torch.arange(bs).repeat_interleave(boxes).float()
    cls = torch.randint(0, nc, (n,), generator=g).float()
    return feats, torch.cat((img[:, None], cls[:, None], c, wh), 1)


def _assigner_inputs(loss: YOLOv8Loss, feats, targets):
    bs = feats[0].shape[0]
    levels = [(f.shape[2], f.shape[3], s) for f, s in zip(feats, loss.strides)]
    pred = torch.cat([f.reshape(bs, f.shape[1], -1) for f in feats], 2)
    dist, logits = pred.split((4 * loss.reg_max, loss.num_classes), 1)
    pts, st = make_anchors(levels, pred.dtype, pred.device)
    boxes = decode_distances(dist.permute(0, 2, 1).contiguous(), pts) * st
    hw = (levels[0][0] * loss.strides[0], levels[0][1] * loss.strides[0])
    labels, gt, mask = preprocess_targets(targets, bs, hw, pred.dtype)
    return (logits.permute(0, 2, 1).sigmoid(), boxes, pts * st, labels, gt, mask, levels)


def _check_equal(a, b) -> None:
    for name, x, y in zip(a._fields, a, b):
        if x.is_floating_point():
            ok = torch.allclose(x, y, rtol=1e-5, atol=1e-7)
        else:
            ok = torch.equal(x, y)
        if not ok:
            raise AssertionError(f"candidate and dense assignment differ in {name}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="detloss bench yolov8", description=__doc__.split("\n\n")[0])
    add_detector_arguments(p)
    args = p.parse_args(argv)
    apply_detector_arguments(args, quick_boxes=12)

    print(
        f"YOLOv8Loss fwd+bwd, batch {args.batch_size}, {args.size}x{args.size}, nc {args.classes}, "
        f"float32, {torch.get_num_threads()} threads; ratio = dense / candidates"
    )
    rows: List[List[object]] = []
    for nb in args.boxes:
        feats, targets = synthetic(args.batch_size, args.size, args.classes, nb)
        lean = YOLOv8Loss(args.classes)
        dense = YOLOv8Loss(args.classes, dense_assigner=True)
        a_in = _assigner_inputs(lean, feats, targets)
        _check_equal(lean.assigner.assign(*a_in), dense.assigner.assign(*a_in))
        torch.testing.assert_close(lean(feats, targets).total, dense(feats, targets).total, rtol=1e-5, atol=0)

        def step(loss_fn):
            fs = [f.detach().requires_grad_(True) for f in feats]
            loss_fn(fs, targets).total.backward()

        for what, runs in (
            ("loss fwd+bwd", {k: (lambda fn=fn: step(fn)) for k, fn in (("candidates", lean), ("dense", dense))}),
            ("assigner", {k: (lambda fn=fn: fn.assigner.assign(*a_in)) for k, fn in (("candidates", lean), ("dense", dense))}),
        ):
            t = {k: median_time(f, repeats=args.repeats, warmup=1) for k, f in runs.items()}
            m = {k: peak_memory(f) for k, f in runs.items()}
            rows.append([nb, what, fmt_ms(t["candidates"]), fmt_ms(t["dense"]), f"{t['dense'] / t['candidates']:.2f}x",
                         fmt_mb(m["candidates"]), fmt_mb(m["dense"]), f"{m['dense'] / max(m['candidates'], 1):.2f}x"])
    print_table(
        ["boxes/img", "what", "time cand.", "time dense", "ratio", "peak cand.", "peak dense", "ratio"], rows
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
