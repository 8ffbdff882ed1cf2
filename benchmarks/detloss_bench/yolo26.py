"""Benchmark: the YOLO26 detect loss, detloss's drop-in criterion
(:class:`detloss.integrations.ultralytics.DetectionLoss`: ``E2ELoss`` form, reg_max 1 L1 boxes)
against ultralytics' own criterion (``model.init_criterion()``: ``E2ELoss(v8DetectionLoss)``), in the
same process on the same inputs. Needs ultralytics (the integrations environment,
``make bench-peers``).

Both criteria are built from one real ``yolo26n.yaml`` model (nc classes) and called as the trainer
calls them: ``loss, items = crit(preds, batch)`` then ``loss.sum().backward()``, on synthetic head
outputs (float32) shaped as the head emits them in training (one-to-many and one-to-one boxes
``[B, 4, A]``, scores ``[B, nc, A]``, feats) and a batch of boxes of random size (2% to 30% of the
image side). Loss vectors, items and gradients are checked to agree (1e-5 relative) before timing.

Measured: forward + backward time (median, the two criteria's runs interleaved so that a change of
machine load does not show as a ratio) and the peak memory torch allocates during it beyond
the inputs. Ratio = ultralytics / detloss (above 1: detloss is faster / smaller).

Run: ``python benchmarks/bench_yolo26.py`` or ``python benchmarks/run.py yolo26`` in the integrations
environment (``--quick`` for tiny sizes; ``--cfg yolov8n.yaml`` for the single-head DFL criterion).
"""
from __future__ import annotations

import argparse
import os
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._common import (
    add_detector_arguments,
    apply_detector_arguments,
    fmt_mb,
    fmt_ms,
    interleaved_median_times,
    peak_memory,
    print_table,
)


def _ultralytics_model(cfg: str, nc: int, epochs: int):
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-config-"))
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    model = DetectionModel(cfg, nc=nc, verbose=False)
    model.args = get_cfg(overrides={"epochs": epochs})
    return model


def synthetic(model, bs: int, size: int, boxes: int, seed: int = 0) -> Tuple[Dict, Dict[str, torch.Tensor]]:
    """Training-time head outputs of ``model``'s head for ``size`` x ``size`` images, and a batch
    of ``boxes`` targets per image."""
    head = model.model[-1]
    g = torch.Generator().manual_seed(seed)
    strides = [int(s) for s in head.stride.tolist()]
    a = sum((size // s) ** 2 for s in strides)

    def branch():
        return {
            "boxes": torch.rand(bs, 4 * head.reg_max, a, generator=g) * (4.0 if head.reg_max == 1 else 1.0),
            "scores": torch.randn(bs, head.nc, a, generator=g) - 2.0,
            "feats": [torch.zeros(bs, 1, size // s, size // s) for s in strides],
        }

    preds = {"one2many": branch(), "one2one": branch()} if getattr(head, "one2one_cv2", None) is not None else branch()
    n = bs * boxes
    wh = torch.rand(n, 2, generator=g) * 0.28 + 0.02
    c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    batch = {
        "batch_idx": torch.arange(bs).repeat_interleave(boxes).float(),
        "cls": torch.randint(0, head.nc, (n, 1), generator=g).float(),
        "bboxes": torch.cat((c, wh), 1),
    }
    return preds, batch


def _leaves(preds):
    """Leaf copies of the boxes / scores (standing for the head's graph), feats as they are."""
    if "one2many" in preds:
        return {k: _leaves(v) for k, v in preds.items()}
    return {"boxes": preds["boxes"].detach().clone().requires_grad_(True),
            "scores": preds["scores"].detach().clone().requires_grad_(True), "feats": preds["feats"]}


def _flat(preds) -> List[torch.Tensor]:
    if "one2many" in preds:
        return _flat(preds["one2many"]) + _flat(preds["one2one"])
    return [preds["boxes"], preds["scores"]]


def _run(crit, leaves, batch):
    for t in _flat(leaves):
        t.grad = None
    loss, items = crit(leaves, batch)
    loss.sum().backward()
    return loss.detach(), items, [t.grad for t in _flat(leaves)]


def _check_equal(a, b, rtol: float = 1e-5) -> None:
    (la, ia, ga), (lb, ib, gb) = a, b
    if list(ia) != list(ib):
        raise AssertionError(f"item names differ: {list(ia)} vs {list(ib)}")
    torch.testing.assert_close(la, lb, rtol=rtol, atol=1e-7)
    torch.testing.assert_close(torch.stack(list(ia.values())), torch.stack(list(ib.values())), rtol=rtol, atol=1e-7)
    for x, y in zip(ga, gb):
        scale = y.abs().max().clamp(min=1e-30)
        if float((x - y).abs().max() / scale) > rtol:
            raise AssertionError("gradients differ")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/run.py yolo26", description=__doc__.split("\n\n")[0])
    p.add_argument("--cfg", default="yolo26n.yaml", help="ultralytics model YAML (its head decides the criterion)")
    add_detector_arguments(p)
    args = p.parse_args(argv)
    apply_detector_arguments(args, quick_boxes=6)

    try:
        import ultralytics  # noqa: F401
    except ImportError:
        print("yolo26: SKIPPED, ultralytics is not installed here (run it in the integrations environment: make bench-peers)")
        return 0
    from detloss.integrations.ultralytics import DetectionLoss

    model = _ultralytics_model(args.cfg, args.classes, epochs=100)
    ours, theirs = DetectionLoss(model), model.init_criterion()
    print(
        f"{args.cfg} detect loss fwd+bwd, batch {args.batch}, {args.size}x{args.size}, nc {args.classes}, "
        f"float32, {torch.get_num_threads()} threads: detloss {type(ours).__name__} ({ours.form}) vs ultralytics "
        f"{type(theirs).__name__}; ratio = ultralytics / detloss"
    )
    rows: List[List[object]] = []
    for nb in args.boxes:
        preds, batch = synthetic(model, args.batch, args.size, nb)
        preds = _leaves(preds)
        _check_equal(_run(ours, preds, batch), _run(theirs, preds, batch))
        fns = {k: (lambda c=c: _run(c, preds, batch)) for k, c in (("detloss", ours), ("ultralytics", theirs))}
        t = interleaved_median_times(fns, args.repeats)
        m = {k: peak_memory(f) for k, f in fns.items()}
        rows.append([nb, fmt_ms(t["detloss"]), fmt_ms(t["ultralytics"]), f"{t['ultralytics'] / t['detloss']:.2f}x",
                     fmt_mb(m["detloss"]), fmt_mb(m["ultralytics"]), f"{m['ultralytics'] / max(m['detloss'], 1):.2f}x"])
    print_table(["boxes/img", "time detloss", "time ultra.", "ratio", "peak detloss", "peak ultra.", "ratio"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
