"""Benchmark: the OBB, pose and segmentation losses, detloss's drop-in criteria
(:class:`detloss.integrations.ultralytics.OBBLoss`, ``PoseLoss``, ``SegmentationLoss``) against
ultralytics' own (``model.init_criterion()``), in the same process on the same inputs. Needs
ultralytics (the integrations environment, ``make bench-peers``).

Both criteria are built from one real ultralytics task model (``yolo26n-{obb,pose,seg}.yaml``:
the end-to-end YOLO26 forms, ``E2ELoss(v8OBBLoss / PoseLoss26 with its RealNVP / SegmentLoss26)``;
``yolov8n-*.yaml``: ``v8OBBLoss``, ``v8PoseLoss``, ``v8SegmentationLoss``) and called as the trainer
calls them: ``loss, items = crit(preds, batch)`` then ``loss.sum().backward()``, on synthetic float32
head outputs shaped as the heads emit them in training and a batch of targets of random size (2% to
30% of the image side; OBB: random angles; pose: 17 COCO keypoints inside the box, a third
invisible; segmentation: each object's mask its box, as ``overlap_mask`` index maps at 1/4 of the
image). Loss vectors, items and gradients (of every head output, and of the flow's parameters) are
checked to agree (1e-4 relative to the largest) before timing.

Measured: forward + backward time (median) and the peak memory torch allocates during it beyond
the inputs. Ratio = ultralytics / detloss (above 1: detloss is faster / smaller).

Run: ``python benchmarks/run.py ultralytics_tasks`` (``--quick`` for tiny sizes, ``--tasks``,
``--families``).
"""
from __future__ import annotations

import argparse
import math
import os
import tempfile
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ._common import fmt_mb, fmt_ms, median_time, peak_memory, print_table

TASKS = ("obb", "pose", "segment")
FAMILIES = ("yolo26", "yolov8")
_MODEL = {"obb": "OBBModel", "pose": "PoseModel", "segment": "SegmentationModel"}
_YAML = {"obb": "{f}n-obb.yaml", "pose": "{f}n-pose.yaml", "segment": "{f}n-seg.yaml"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=640, help="image side in pixels (square)")
    p.add_argument("--classes", type=int, default=80, help="classes of the OBB and segmentation models (pose: 1)")
    p.add_argument("--boxes", type=int, nargs="+", default=[8, 100], help="targets per image")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--peers", action="store_true", help="accepted for bench-peers; this suite always runs the peer")


def _model(task: str, family: str, nc: int, epochs: int = 100):
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-config-"))
    from ultralytics.cfg import get_cfg
    from ultralytics.nn import tasks

    cls = getattr(tasks, _MODEL[task])
    kw = {"data_kpt_shape": (17, 3)} if task == "pose" else {}
    model = cls(_YAML[task].format(f=family), nc=1 if task == "pose" else nc, verbose=False, **kw)
    model.args = get_cfg(overrides={"epochs": epochs})
    return model


def synthetic(model, task: str, bs: int, size: int, boxes: int, seed: int = 0) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Training-time head outputs of ``model``'s head (leaves) and a batch of ``boxes`` targets per image."""
    head = model.model[-1]
    names = {c.__name__ for c in type(head).__mro__}
    g = torch.Generator().manual_seed(seed)
    strides = [int(s) for s in head.stride.tolist()]
    a = sum((size // s) ** 2 for s in strides)
    leaf = lambda *shape, scale=1.0, shift=0.0: (torch.randn(*shape, generator=g) * scale + shift).requires_grad_(True)

    def branch(proto=None):
        out = {
            "boxes": leaf(bs, 4 * head.reg_max, a, scale=1.0 if head.reg_max > 1 else 0.5, shift=0.0 if head.reg_max > 1 else 2.0),
            "scores": leaf(bs, head.nc, a, shift=-2.0),
            "feats": [torch.zeros(bs, 1, size // s, size // s) for s in strides],
        }
        if task == "obb":
            raw = torch.randn(bs, 1, a, generator=g)
            out["angle"] = (raw if "OBB26" in names else (raw.sigmoid() - 0.25) * math.pi).requires_grad_(True)
        elif task == "pose":
            k, d = head.kpt_shape
            out["kpts"] = leaf(bs, k * d, a, scale=0.5)
            if "Pose26" in names:
                out["kpts_sigma"] = leaf(bs, 2 * k, a)
        else:
            out["mask_coefficient"] = leaf(bs, 32, a, scale=0.3)
            out["proto"] = proto
        return out

    proto = None
    if task == "segment":
        proto = leaf(bs, 32, size // 4, size // 4)
        if "Segment26" in names:
            proto = (proto, leaf(bs, head.nc, size // 8, size // 8))
    e2e = getattr(head, "one2one_cv2", None) is not None
    if e2e:
        m = branch(proto)
        o = branch(tuple(p.detach() for p in proto) if isinstance(proto, tuple) else None if proto is None else proto.detach())
        o["feats"] = m["feats"]
        preds = {"one2many": m, "one2one": o}
    else:
        preds = branch(proto)

    n = bs * boxes
    wh = torch.rand(n, 2, generator=g) * 0.28 + 0.02
    c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    img = torch.arange(bs).repeat_interleave(boxes)
    batch: Dict[str, Any] = {
        "batch_idx": img.float(),
        "cls": torch.randint(0, head.nc, (n, 1), generator=g).float(),
        "bboxes": torch.cat((c, wh), 1),
    }
    if task == "obb":
        batch["bboxes"] = torch.cat((c, wh, torch.rand(n, 1, generator=g) * (math.pi / 2)), 1)
    elif task == "pose":
        k = head.kpt_shape[0]
        xy = c[:, None] + (torch.rand(n, k, 2, generator=g) - 0.5) * wh[:, None]
        vis = torch.where(torch.rand(n, k, 1, generator=g) < 0.33, 0.0, 2.0)
        batch["keypoints"] = torch.cat((xy * (vis > 0), vis), -1)
    else:
        hm = size // 4
        px = (torch.arange(hm) + 0.5) / hm
        x1y1, x2y2 = c - wh / 2, c + wh / 2
        inside = ((px[None, None, :] >= x1y1[:, 0, None, None]) & (px[None, None, :] < x2y2[:, 0, None, None])
                  & (px[None, :, None] >= x1y1[:, 1, None, None]) & (px[None, :, None] < x2y2[:, 1, None, None]))
        index = (torch.arange(n) - img * boxes + 1)[:, None, None] * inside  # later objects on top
        masks = index.view(bs, boxes, hm, hm).amax(1).to(torch.uint8)
        batch["masks"] = masks
        cls = batch["cls"].view(bs, boxes)
        batch["sem_masks"] = torch.gather(cls, 1, (masks.long() - 1).clamp(min=0).view(bs, -1)).view(bs, hm, hm)
    return preds, batch


def _leaves(preds) -> List[torch.Tensor]:
    if "one2many" in preds:
        return _leaves(preds["one2many"]) + _leaves(preds["one2one"])
    out = []
    for k, v in preds.items():
        for t in (v if isinstance(v, tuple) else (v,)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                out.append(t)
    return out


def _run(crit, preds, batch, params: Sequence[torch.Tensor]):
    leaves = _leaves(preds) + list(params)
    for t in leaves:
        t.grad = None
    loss, items = crit(preds, batch)
    loss.sum().backward()
    return loss.detach(), items, [t.grad for t in leaves]


def _check_equal(a, b, rtol: float = 1e-4) -> None:
    (la, ia, ga), (lb, ib, gb) = a, b
    if list(ia) != list(ib):
        raise AssertionError(f"item names differ: {list(ia)} vs {list(ib)}")
    scale = lb.abs().max().clamp(min=1e-30)
    if float((la - lb).abs().max() / scale) > rtol:
        raise AssertionError(f"loss vectors differ: {la.tolist()} vs {lb.tolist()}")
    for x, y in zip(ga, gb):
        x = torch.zeros_like(y) if x is None and y is not None else x
        y = torch.zeros_like(x) if y is None and x is not None else y
        if x is None:
            continue
        if float((x - y).abs().max() / y.abs().max().clamp(min=1e-30)) > rtol:
            raise AssertionError("gradients differ")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/run.py ultralytics_tasks", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.size, args.classes, args.boxes, args.repeats = 2, 128, 4, [6], 1
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        import ultralytics  # noqa: F401
    except ImportError:
        print("ultralytics_tasks: SKIPPED, ultralytics is not installed here (run it in the integrations environment: make bench-peers)")
        return 0
    from detloss.integrations import ultralytics as du

    ours_cls = {"obb": du.OBBLoss, "pose": du.PoseLoss, "segment": du.SegmentationLoss}
    print(
        f"OBB / pose / segmentation losses fwd+bwd, batch {args.batch_size}, {args.size}x{args.size}, nc {args.classes} "
        f"(pose 1), float32, {torch.get_num_threads()} threads; ratio = ultralytics / detloss"
    )
    rows: List[List[object]] = []
    for family in args.families:
        for task in args.tasks:
            model = _model(task, family, args.classes)
            ours, theirs = ours_cls[task](model), model.init_criterion()
            flow = getattr(model.model[-1], "flow_model", None)
            params = list(flow.parameters()) if flow is not None else []
            label = f"{family} {task} ({type(theirs).__name__})"
            for nb in args.boxes:
                preds, batch = synthetic(model, task, args.batch_size, args.size, nb)
                _check_equal(_run(ours, preds, batch, params), _run(theirs, preds, batch, params))
                t = {k: median_time(lambda c=c: _run(c, preds, batch, params), repeats=args.repeats, warmup=1)
                     for k, c in (("detloss", ours), ("ultralytics", theirs))}
                m = {k: peak_memory(lambda c=c: _run(c, preds, batch, params)) for k, c in (("detloss", ours), ("ultralytics", theirs))}
                rows.append([label, nb, fmt_ms(t["detloss"]), fmt_ms(t["ultralytics"]), f"{t['ultralytics'] / t['detloss']:.2f}x",
                             fmt_mb(m["detloss"]), fmt_mb(m["ultralytics"]), f"{m['ultralytics'] / max(m['detloss'], 1):.2f}x"])
                print("  " + "  ".join(str(c) for c in rows[-1]), flush=True)
    print_table(["loss", "boxes/img", "time detloss", "time ultra.", "ratio", "peak detloss", "peak ultra.", "ratio"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
