"""``detloss train``: train a small detector on CPU end to end with one of the detector losses.

Data: by default synthetic shapes generated on the fly (a fresh image for every sample,
deterministic by seed); ``--data DIR`` (YOLO txt: images/ and labels/) or ``--data FILE.json``
(COCO, images next to the json or in ``--images``). Model: :class:`detloss.tools.demo.models.Detector`
with the head the loss takes. Optimizer: AdamW (scale-free, so the four losses' different
scalings need no per-loss learning rate), linear warm-up then cosine decay, gradient clipping,
and an exponential moving average of the weights that is what gets evaluated.

Budget: ``--steps`` (default; the run is then deterministic by ``--seed``) and optionally
``--minutes`` (training stops when time runs out; the learning-rate schedule follows whichever
budget is closer to its end).

Multi-process: under ``torchrun --nproc_per_node N`` the gloo backend and
DistributedDataParallel are used; ``--batch-size`` is the global batch, split over the ranks;
the losses' normalizers are reduced across ranks (:mod:`detloss.distributed`). Rank 0
evaluates and writes the outputs.

Outputs in ``runs/NAME/``: ``metrics.json`` (COCO mAP@0.5, mAP@0.5:0.95, per-class AP50,
final loss components, timings, settings, the loss history), ``loss_curves.png``,
``predictions.png``, ``assignment.png`` and ``weights.pt`` (the evaluated weights and the model config).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ... import distributed as dist_utils
from .data import SyntheticShapes, Subset, collate, hflip, open_dataset
from .models import LOSSES, Detector

DEFAULT_STEPS = 1000
VAL_SEED_OFFSET = 1_000_003


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loss", choices=LOSSES, default="yolov5", help="detector loss (default: yolov5)")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"training steps (default: {DEFAULT_STEPS})")
    p.add_argument("--minutes", type=float, default=None,
                   help="also stop training after this many minutes (the run is then no longer deterministic)")
    p.add_argument("--batch-size", type=int, default=32, help="global batch size, split over the ranks (default: 32)")
    p.add_argument("--img-size", type=int, default=128, help="square image side in pixels, multiple of 32 (default: 128)")
    p.add_argument("--width", type=float, default=1.0, help="model channel multiplier (default: 1.0)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of AdamW (default: 3e-3)")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="AdamW weight decay on conv weights (default: 5e-4)")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps (default: 100)")
    p.add_argument("--ema", type=float, default=0.999, help="weight EMA decay, 0 to evaluate the raw weights (default: 0.999)")
    p.add_argument("--seed", type=int, default=0, help="seed of data, initialization and augmentation (default: 0)")
    p.add_argument("--data", default=None, help="YOLO txt folder (images/, labels/) or COCO .json; default: synthetic shapes")
    p.add_argument("--images", default=None, help="image folder of a COCO json (default: the json's folder)")
    p.add_argument("--val-data", default=None, help="validation set in the same formats (default: 10%% of --data)")
    p.add_argument("--val-images", type=int, default=256, help="synthetic validation images (default: 256)")
    p.add_argument("--project", default="runs", help="parent folder of the run folder (default: runs)")
    p.add_argument("--name", default=None, help="run folder name (default: the loss name)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default: cores / processes)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (one line every 10%% instead)")


# --------------------------------------------------------------------------------------------
# The loss: the registered one for the model's head, called through its hooks.

def build_loss(model: Detector) -> Callable:
    """The loss for ``model``'s head, as ``fn(outputs, rows) -> LossOutput``: its normalizers
    are reduced across ranks when distributed (``reduce_across_ranks``)."""
    loss = model.build_loss(reduce_across_ranks=dist_utils.is_initialized())
    size = (model.img_size, model.img_size)

    def fn(outputs, rows):
        args = outputs if isinstance(outputs, tuple) else (outputs,)  # what the loss takes before its targets
        first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
        return loss(*args, loss.targets_from_rows(rows, first.shape[0], size), **loss.call_kwargs(size))

    return fn


# --------------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of a model's weights and buffers, warmed up like yolov5's
    ModelEMA: ``decay_t = decay * (1 - exp(-t / tau))`` so early averages follow the weights."""

    def __init__(self, model: torch.nn.Module, decay: float, tau: float = 200.0) -> None:
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay, self.tau, self.updates = decay, tau, 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        d = self.decay * (1 - math.exp(-self.updates / self.tau))
        src = model.state_dict()
        for k, v in self.module.state_dict().items():
            if v.dtype.is_floating_point:
                v.mul_(d).add_(src[k].detach(), alpha=1 - d)
            else:
                v.copy_(src[k])


def lr_factor(progress: float, warmup_fraction: float) -> float:
    """Linear warm-up from 0.1 to 1 over ``warmup_fraction`` of training, then cosine to 0.05."""
    if progress < warmup_fraction:
        return 0.1 + 0.9 * progress / warmup_fraction
    t = (progress - warmup_fraction) / max(1e-9, 1 - warmup_fraction)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class Batches:
    """The training stream: for step ``s``, this rank's share of the global batch.

    Synthetic data: global sample ``s * B + j`` is image ``s * B + j`` of the generator (every
    sample is new). Disk data: a seeded permutation per epoch and a seeded horizontal flip."""

    def __init__(self, dataset, batch_size: int, seed: int, rank: int, world: int, synthetic: bool) -> None:
        self.ds, self.B, self.seed, self.rank, self.world, self.synthetic = dataset, batch_size, seed, rank, world, synthetic
        self.local = batch_size // world
        self._perm: Dict[int, torch.Tensor] = {}

    def _item(self, j: int):
        if self.synthetic:
            return self.ds[j % len(self.ds)]
        n = len(self.ds)
        epoch, pos = divmod(j, n)
        if epoch not in self._perm:
            self._perm = {epoch: torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))}
        image, labels = self.ds[int(self._perm[epoch][pos])]
        flip = torch.rand((), generator=torch.Generator().manual_seed(self.seed * 104729 + j)) < 0.5
        return hflip(image, labels) if flip else (image, labels)

    def get(self, step: int):
        start = step * self.B + self.rank * self.local
        return collate([self._item(j) for j in range(start, start + self.local)])


def _datasets(args, rank: int):
    if args.data is None:
        train = SyntheticShapes(2**62, args.img_size, seed=args.seed)
        val = SyntheticShapes(args.val_images, args.img_size, seed=args.seed + VAL_SEED_OFFSET)
        return train, val, True
    full = open_dataset(args.data, args.img_size, args.images)
    if args.val_data:
        val = open_dataset(args.val_data, args.img_size, args.images)
        return full, val, False
    n = len(full)
    if n < 10:
        if rank == 0:
            print(f"note: {n} images in {args.data}: too few to hold some out, validating on the training images")
        return full, full, False
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(args.seed)).tolist()
    k = max(1, n // 10)
    return Subset(full, perm[k:]), Subset(full, perm[:k]), False


def _init_distributed() -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist_utils.is_initialized():
        torch.distributed.init_process_group("gloo")


MAX_IMG_SIZE = 4096


def _check_args(args) -> None:
    """Every argument checked before any data is read or any training starts."""
    def finite(name: str, value: float, low: float, low_ok: bool, what: str) -> None:
        if not (math.isfinite(value) and (value >= low if low_ok else value > low)):
            raise ValueError(f"{name}: expected {what}, got {value}")

    if args.steps < 1:
        raise ValueError(f"--steps: expected a positive number of steps, got {args.steps}")
    if args.minutes is not None and not (math.isfinite(args.minutes) and args.minutes > 0):
        raise ValueError(f"--minutes: expected a positive number, got {args.minutes}")
    if args.img_size < 32 or args.img_size % 32:
        raise ValueError(f"--img-size: expected a multiple of 32, got {args.img_size}")
    if args.img_size > MAX_IMG_SIZE:
        raise ValueError(f"--img-size: expected at most {MAX_IMG_SIZE} pixels, got {args.img_size}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: expected a positive number, got {args.batch_size}")
    if not 0 <= args.ema < 1:
        raise ValueError(f"--ema: expected a decay in [0, 1), got {args.ema}")
    finite("--lr", args.lr, 0.0, False, "a positive finite learning rate")
    finite("--weight-decay", args.weight_decay, 0.0, True, "a finite number >= 0")
    finite("--width", args.width, 0.0, False, "a positive finite channel multiplier")
    if args.warmup < 0:
        raise ValueError(f"--warmup: expected a number of steps >= 0, got {args.warmup}")
    if args.seed < 0:
        raise ValueError(f"--seed: expected a seed >= 0, got {args.seed}")
    if args.val_images < 1:
        raise ValueError(f"--val-images: expected a positive number of images, got {args.val_images}")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads: expected a positive number of threads, got {args.threads}")
    if args.images is not None and args.data is None:
        raise ValueError("--images: applies to a COCO json given with --data, and no --data was given")
    if args.val_data is not None and args.data is None:
        raise ValueError("--val-data: applies with --data (the synthetic data has its own validation set)")
    _check_writable_folder("--project", Path(args.project) / (args.name or args.loss))


def _check_writable_folder(name: str, folder: Path) -> None:
    """``folder`` exists as a folder or can be created (its nearest existing parent is a writable folder)."""
    probe = folder.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{name}: cannot create the run folder {folder}: {probe} is not a folder")
    if not os.access(probe, os.W_OK):
        raise ValueError(f"{name}: cannot create the run folder {folder}: {probe} is not writable")


def run(args) -> int:
    """Train, evaluate and write the outputs; returns the exit status (2 for bad arguments or data)."""
    wall0 = time.perf_counter()
    _init_distributed()
    rank, world = dist_utils.rank(), dist_utils.world_size()
    try:
        _check_args(args)
        if args.batch_size % world:
            raise ValueError(f"--batch-size: expected a multiple of the number of processes ({world}), "
                             f"got {args.batch_size}")
        train_set, val_set, synthetic = _datasets(args, rank)
    except (ValueError, FileNotFoundError) as e:
        print(f"detloss train: error: {e}", file=sys.stderr)
        if world > 1:
            torch.distributed.destroy_process_group()
        return 2
    threads = args.threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    names = train_set.names
    model = Detector(args.loss, len(names), args.img_size, args.width)
    loss_fn = build_loss(model)
    ema = EMA(model, args.ema) if args.ema > 0 else None
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model)

    decay, no_decay = [], []
    for n_, p in model.named_parameters():
        (decay if p.ndim == 4 else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    batches = Batches(train_set, args.batch_size, args.seed, rank, world, synthetic)
    budget_s = args.minutes * 60 if args.minutes else None
    warmup_fraction = min(0.3, args.warmup / args.steps)

    history: Dict[str, List[float]] = {"step": [], "lr": [], "total": []}
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, desc=f"train {args.loss}", unit="step", dynamic_ncols=True, file=sys.stdout)
    if rank == 0:
        print(f"detloss train: loss {args.loss}, {'synthetic shapes' if synthetic else args.data} "
              f"({len(names)} classes), {args.img_size}px, batch {args.batch_size} on {world} process(es) x "
              f"{threads} thread(s), {args.steps} steps" + (f" or {args.minutes} min" if budget_s else ""))
    model.train()
    t0 = time.perf_counter()
    step = 0
    last = {}
    while step < args.steps:
        elapsed = time.perf_counter() - t0
        progress = step / args.steps
        if budget_s:
            state = torch.tensor([elapsed / budget_s])
            if world > 1:
                torch.distributed.broadcast(state, 0)  # every rank follows rank 0's clock
            if float(state) >= 1.0:
                break
            progress = max(progress, float(state))
        lr = args.lr * lr_factor(progress, warmup_fraction)
        for g in opt.param_groups:
            g["lr"] = lr
        images, rows = batches.get(step)
        out = loss_fn(net(images), rows)
        if not torch.isfinite(out.total):
            raise FloatingPointError(f"loss: the {args.loss} loss became {float(out.total)} at step {step}")
        opt.zero_grad(set_to_none=True)
        out.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        if ema is not None:
            ema.update(model)
        step += 1
        last = {k: float(v) for k, v in out.components.items()}
        history["step"].append(step)
        history["lr"].append(lr)
        history["total"].append(float(out.total.detach()))
        for k, v in last.items():
            history.setdefault(k, []).append(v)
        if rank == 0:
            speed = step * args.batch_size / max(1e-9, time.perf_counter() - t0)
            if bar is not None:
                bar.set_postfix_str(" ".join(f"{k} {v:.4f}" for k, v in last.items())
                                    + f" lr {lr:.2e} {speed:.0f} img/s", refresh=False)
                bar.update(1)
            elif step % max(1, args.steps // 10) == 0:
                print(f"step {step}/{args.steps} " + " ".join(f"{k} {v:.4f}" for k, v in last.items())
                      + f" lr {lr:.2e} {speed:.0f} img/s", flush=True)
    if bar is not None:
        bar.close()
    train_s = time.perf_counter() - t0

    code = 0
    if rank == 0:
        code = _finish(args, model if ema is None else ema.module, val_set, names, history, last, step, train_s,
                       wall0, world, threads, synthetic)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return code


def _finish(args, model, val_set, names, history, last, steps, train_s, wall0, world, threads, synthetic) -> int:
    from .evaluate import evaluate
    from .plots import loss_curves, predictions_grid

    out_dir = Path(args.project) / (args.name or args.loss)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_eval = time.perf_counter()
    metrics, preds = evaluate(model, args.loss, val_set)
    eval_s = time.perf_counter() - t_eval

    files = {"metrics": "metrics.json", "loss_curves": "loss_curves.png", "predictions": "predictions.png",
             "assignment": "assignment.png", "weights": "weights.pt"}
    torch.save({"config": model.config, "width": args.width, "state_dict": model.state_dict()}, out_dir / files["weights"])
    loss_curves(history, out_dir / files["loss_curves"],
                title=f"{args.loss}: {steps} steps, mAP@0.5 {metrics['map50']:.3f}")
    k = min(16, len(val_set))
    items = [val_set[i] for i in range(k)]
    predictions_grid([im for im, _ in items], preds[:k], [l for _, l in items], names, out_dir / files["predictions"])
    note = _assignment_picture(model, items[0], out_dir / files["assignment"])
    if note:
        files.pop("assignment")
        print(f"note: {note}")

    result = {
        "loss": args.loss,
        "map50": metrics["map50"],
        "map50_95": metrics["map50_95"],
        "ap50_per_class": metrics["ap50_per_class"],
        "val_images": metrics["num_images"],
        "val_objects": metrics["num_objects"],
        "val_detections": metrics["num_detections"],
        "steps": steps,
        "images_seen": steps * args.batch_size,
        "final_loss": last,
        "train_seconds": round(train_s, 2),
        "eval_seconds": round(eval_s, 2),
        "wall_seconds": round(time.perf_counter() - wall0, 2),
        "images_per_second": round(steps * args.batch_size / max(train_s, 1e-9), 1),
        "world_size": world,
        "threads_per_process": threads,
        "data": "synthetic shapes" if synthetic else args.data,
        "classes": list(names),
        "settings": {k: v for k, v in vars(args).items() if not k.startswith("_")},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "files": files,
        "history": history,
    }
    (out_dir / files["metrics"]).write_text(json.dumps(result, indent=1))
    print(f"{args.loss}: mAP@0.5 {metrics['map50']:.4f}  mAP@0.5:0.95 {metrics['map50_95']:.4f}  "
          f"({steps} steps, train {train_s:.1f} s, total {result['wall_seconds']:.1f} s) -> {out_dir}")
    return 0


def _assignment_picture(model: Detector, item, path: Path) -> Optional[str]:
    """Draw which cells/anchors/points the first validation image's boxes are assigned to,
    with :func:`detloss.tools.viz.assignment_picture`; returns a note when that is not possible."""
    try:
        from .. import viz
    except ImportError as e:
        return f"assignment.png skipped: detloss.tools.viz is not available ({e})"
    fn = getattr(viz, "assignment_picture", None)
    if fn is None:
        return "assignment.png skipped: detloss.tools.viz has no assignment_picture"
    from PIL import Image

    image, labels = item
    rows = torch.cat((torch.zeros(len(labels), 1), labels), 1)
    h, w = image.shape[-2:]
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    kw = dict(model.config["loss_kwargs"])  # the loss as the demo trains it
    fn(model.loss, rows, image=pil, size=(h, w), **kw).save(path)
    return None
