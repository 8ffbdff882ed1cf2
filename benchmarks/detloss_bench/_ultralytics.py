"""What the suites comparing detloss's drop-in criteria with ultralytics' own share (``yolo26``,
``ultralytics_tasks``): the real ultralytics model (the peer's criterion is its
``init_criterion()``), a stand-in model for runs without ultralytics, synthetic head outputs shaped
as the head emits them in training, a batch of targets, and the two :class:`~._common.Side` objects.

With ultralytics installed both criteria are built from the same real model (detloss's as a user
builds it: ``DetectionLoss(model)``, ...). Without it detloss's criterion is built from a stand-in
exposing what the drop-ins read (``parameters()``, ``args`` with ultralytics' default gains,
``model[-1]`` with the head's stride, nc, reg_max, kpt_shape, flow_model, one2one_cv2 and a class
of the head's name), so that ``--quick`` runs anywhere.
"""
from __future__ import annotations

import math
import os
import tempfile
from types import SimpleNamespace
from typing import Any, Dict, List, Sequence, Tuple

import torch

from ._common import PeerMissing, Side, import_peer, run_suite

INSTALL = "ultralytics==8.4.190"
#: ultralytics 8.4.190's default hyperparameters the criteria read (cfg/default.yaml).
DEFAULT_ARGS = dict(box=7.5, cls=0.5, dfl=1.5, angle=1.0, pose=12.0, kobj=1.0, rle=1.0, overlap_mask=True)
#: ultralytics' model class per task.
MODEL_CLASS = {"detect": "DetectionModel", "obb": "OBBModel", "pose": "PoseModel", "segment": "SegmentationModel"}
#: The head a model YAML builds, for the stand-in (head class and its ultralytics bases, reg_max,
#: end to end), and the criterion ultralytics trains it with.
HEADS = {
    "yolov8n.yaml": (("Detect",), 16, False, "v8DetectionLoss"),
    "yolo26n.yaml": (("Detect",), 1, True, "E2ELoss(v8DetectionLoss)"),
    "yolov8n-obb.yaml": (("OBB", "Detect"), 16, False, "v8OBBLoss"),
    "yolo26n-obb.yaml": (("OBB26", "OBB", "Detect"), 1, True, "E2ELoss(v8OBBLoss)"),
    "yolov8n-pose.yaml": (("Pose", "Detect"), 16, False, "v8PoseLoss"),
    "yolo26n-pose.yaml": (("Pose26", "Pose", "Detect"), 1, True, "E2ELoss(PoseLoss26)"),
    "yolov8n-seg.yaml": (("Segment", "Detect"), 16, False, "v8SegmentationLoss"),
    "yolo26n-seg.yaml": (("Segment26", "Segment", "Detect"), 1, True, "E2ELoss(SegmentLoss26)"),
}
STRIDES = (8.0, 16.0, 32.0)
KPT_SHAPE = [17, 3]
NUM_MASKS = 32


def _ultralytics_env() -> None:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-config-"))


def real_model(cfg: str, task: str, nc: int, epochs: int = 100):
    """ultralytics' task model built from ``cfg`` with ``nc`` classes (pose: 17 keypoints) and its
    default args; :class:`~._common.PeerMissing` when ultralytics does not import."""
    _ultralytics_env()
    tasks = import_peer("ultralytics.nn.tasks", INSTALL)
    get_cfg = import_peer("ultralytics.cfg", INSTALL).get_cfg
    kw = {"data_kpt_shape": list(KPT_SHAPE)} if task == "pose" else {}
    model = getattr(tasks, MODEL_CLASS[task])(cfg, nc=nc, verbose=False, **kw)
    model.args = get_cfg(overrides={"epochs": epochs})
    return model


def _head_class(names: Sequence[str]) -> type:
    cls: type = torch.nn.Module
    for name in reversed(names):  # ("OBB26", "OBB", "Detect"): Detect first
        cls = type(name, (cls,), {})
    return cls


def stand_in_model(cfg: str, task: str, nc: int, epochs: int = 100):
    """A model exposing what the drop-ins read, with the head ``cfg`` builds (:data:`HEADS`); a
    ``Pose26`` head carries a :class:`detloss.nn.RealNVP` (ultralytics' default flow)."""
    if cfg not in HEADS:
        raise SystemExit(f"--cfg {cfg}: without ultralytics only {', '.join(HEADS)} are described here")
    names, reg_max, e2e, _ = HEADS[cfg]
    head = _head_class(names)()
    head.stride = torch.tensor(STRIDES)
    head.nc, head.reg_max = nc, reg_max
    if e2e:
        head.one2one_cv2 = torch.nn.Identity()
    if task == "pose":
        head.kpt_shape = list(KPT_SHAPE)
        if "Pose26" in names:
            from detloss.nn import RealNVP

            head.flow_model = RealNVP()
    model = torch.nn.Module()
    model.model = torch.nn.ModuleList([head])
    model.args = SimpleNamespace(epochs=epochs, **DEFAULT_ARGS)
    model.register_parameter("weight", torch.nn.Parameter(torch.zeros(1)))  # next(model.parameters())
    return model


def head_names(head: Any) -> set:
    return {c.__name__ for c in type(head).__mro__}


def random_boxes(g: torch.Generator, n: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Centres and sizes (normalized) of ``n`` boxes whose sides are 2% to 30% of the image's."""
    wh = torch.rand(n, 2, generator=g) * 0.28 + 0.02
    return wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh), wh


def synthetic(model: Any, task: str, bs: int, size: int, boxes: int, seed: int = 0) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Training-time head outputs of ``model``'s head (float32 leaves) for ``size`` x ``size``
    images and a batch of ``boxes`` targets per image (OBB: random angles; pose: keypoints inside
    the box, a third invisible; segmentation: each object's mask its box, as ``overlap_mask``
    index maps at 1/4 of the image, later objects on top, and the semantic class map)."""
    head = model.model[-1]
    names = head_names(head)
    g = torch.Generator().manual_seed(seed)
    strides = [int(s) for s in head.stride.tolist()]
    a = sum((size // s) ** 2 for s in strides)
    dfl = head.reg_max > 1

    def leaf(*shape: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale + shift).requires_grad_(True)

    def branch(proto: Any = None) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "boxes": leaf(bs, 4 * head.reg_max, a, scale=1.0 if dfl else 0.5, shift=0.0 if dfl else 2.0),
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
        elif task == "segment":
            out["mask_coefficient"] = leaf(bs, NUM_MASKS, a, scale=0.3)
            out["proto"] = proto
        return out

    proto: Any = None
    if task == "segment":
        proto = leaf(bs, NUM_MASKS, size // 4, size // 4)
        if "Segment26" in names:
            proto = (proto, leaf(bs, head.nc, size // 8, size // 8))
    if getattr(head, "one2one_cv2", None) is not None:  # the one-to-one branch sees feats and proto detached
        m = branch(proto)
        o = branch(None if proto is None else tuple(p.detach() for p in proto) if isinstance(proto, tuple) else proto.detach())
        o["feats"] = [f.detach() for f in m["feats"]]
        preds: Dict[str, Any] = {"one2many": m, "one2one": o}
    else:
        preds = branch(proto)

    n = bs * boxes
    c, wh = random_boxes(g, n)
    img = torch.arange(bs).repeat_interleave(boxes)
    batch: Dict[str, Any] = {"batch_idx": img.float(), "cls": torch.randint(0, head.nc, (n, 1), generator=g).float(),
                             "bboxes": torch.cat((c, wh), 1)}
    if task == "obb":
        batch["bboxes"] = torch.cat((c, wh, torch.rand(n, 1, generator=g) * (math.pi / 2)), 1)
    elif task == "pose":
        k = head.kpt_shape[0]
        xy = c[:, None] + (torch.rand(n, k, 2, generator=g) - 0.5) * wh[:, None]
        vis = torch.where(torch.rand(n, k, 1, generator=g) < 0.33, 0.0, 2.0)
        batch["keypoints"] = torch.cat((xy * (vis > 0), vis), -1)
    elif task == "segment":
        hm = size // 4
        px = (torch.arange(hm) + 0.5) / hm
        x1y1, x2y2 = c - wh / 2, c + wh / 2
        inside = ((px[None, None, :] >= x1y1[:, 0, None, None]) & (px[None, None, :] < x2y2[:, 0, None, None])
                  & (px[None, :, None] >= x1y1[:, 1, None, None]) & (px[None, :, None] < x2y2[:, 1, None, None]))
        index = (torch.arange(n) - img * boxes + 1)[:, None, None] * inside
        masks = index.view(bs, boxes, hm, hm).amax(1).to(torch.uint8)
        batch["masks"] = masks
        cls = batch["cls"].view(bs, boxes)
        batch["sem_masks"] = torch.gather(cls, 1, (masks.long() - 1).clamp(min=0).view(bs, -1)).view(bs, hm, hm)
    return preds, batch


def leaves_of(preds: Any) -> List[torch.Tensor]:
    """The head outputs that take gradients, in a fixed order (one-to-many branch first)."""
    if "one2many" in preds:
        return leaves_of(preds["one2many"]) + leaves_of(preds["one2one"])
    out = []
    for v in preds.values():
        for t in (v if isinstance(v, tuple) else (v,)):
            if isinstance(t, torch.Tensor) and t.requires_grad:
                out.append(t)
    return out


def criterion_side(label: str, crit: Any, preds: Any, batch: Dict[str, Any], params: Sequence[torch.Tensor]) -> Side:
    """One criterion as the trainer calls it: ``loss, items = crit(preds, batch)``; the total is
    ``loss.sum()`` (what the trainer backpropagates), the terms are the items, the leaves the head
    outputs and the flow model's parameters."""
    return Side(label, lambda: crit(preds, batch)[0].sum(), leaves_of(preds) + list(params),
                lambda: {k: float(v) for k, v in crit(preds, batch)[1].items()})


def flow_parameters(model: Any) -> List[torch.nn.Parameter]:
    flow = getattr(model.model[-1], "flow_model", None)
    return list(flow.parameters()) if flow is not None else []


def describe(model: Any) -> Dict[str, Any]:
    """What the drop-ins read from a model's head, for comparing the stand-in with the real model."""
    head = model.model[-1]
    return {"classes": tuple(n for n in (c.__name__ for c in type(head).__mro__) if n in
                             {"Detect", "OBB", "OBB26", "Pose", "Pose26", "Segment", "Segment26", "v10Detect"}),
            "stride": tuple(float(s) for s in head.stride.tolist()), "nc": int(head.nc), "reg_max": int(head.reg_max),
            "e2e": getattr(head, "one2one_cv2", None) is not None, "kpt_shape": getattr(head, "kpt_shape", None),
            "flow": type(getattr(head, "flow_model", None)).__name__}


def criterion_name(crit: Any) -> str:
    """``"v8PoseLoss"``, ``"E2ELoss(PoseLoss26)"``, ...: an ultralytics criterion and its base."""
    inner = getattr(crit, "one2many", None)
    return type(crit).__name__ + (f"({type(inner).__name__})" if inner is not None else "")


def run_criterion_suite(suite: str, args: Any, cfg: str, task: str, ours_cls: Any, nc: int) -> int:
    """:func:`~._common.run_suite` for one model YAML: detloss's drop-in ``ours_cls(model)`` against
    ``model.init_criterion()`` on the same head outputs and batch, at each of ``args.boxes``."""
    try:
        with torch.random.fork_rng():  # the model's random weights (the RLE flow's among them) alike in every run
            torch.manual_seed(0)
            model = real_model(cfg, task, nc)
        peer, missing = model.init_criterion(), None
        label = "ultralytics " + criterion_name(peer)
    except PeerMissing as e:
        model, peer, missing = stand_in_model(cfg, task, nc), None, e
        label = "ultralytics " + HEADS[cfg][3] if cfg in HEADS else "ultralytics"
    ours = ours_cls(model)
    params = flow_parameters(model)

    def build_peer() -> Any:
        if missing is not None:
            raise missing
        return peer

    def case(nb: int, peer: Any) -> Tuple[Side, Any]:
        preds, batch = synthetic(model, task, args.batch, args.size, nb)
        side = criterion_side("detloss", ours, preds, batch, params)
        return side, None if peer is None else criterion_side(label, peer, preds, batch, params)

    title = (f"{cfg} {task} loss: detloss {type(ours).__name__} ({ours.form}) against {label}; batch {args.batch}, "
             f"{args.size}x{args.size}, nc {nc}, reg_max {model.model[-1].reg_max}, float32, CPU, "
             f"{torch.get_num_threads()} threads, median of {args.repeats}")
    return run_suite(suite, args, title, label, build_peer, case)
