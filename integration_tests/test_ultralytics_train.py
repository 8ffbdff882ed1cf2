"""A real ultralytics 8.4.190 training run with detloss's criterion swapped in gives the same
per-iteration loss items as the run with ultralytics' own criterion.

``yolov8n.yaml`` (v8DetectionLoss, DFL) and ``yolo26n.yaml`` (E2ELoss: one-to-many + one-to-one,
reg_max 1 L1 boxes, the schedule stepped after every epoch) are trained from scratch twice each, on
a tiny synthetic YOLO-format dataset written into tmp_path: same seed, deterministic=True, one torch
thread, no weights, no downloads (YOLO_OFFLINE, amp=False, plots=False, val=False), workers=0,
ultralytics' default optimizer and schedule. The items of every iteration (>= 20) must agree to 1e-5
relative, and the loss the trainer backpropagates too. The swap-in is the README's:
``use_detloss(YOLO(cfg)).train(...)``.

The runs are in float64 (model built under a float64 default dtype, batches cast by a trainer
subclass; the last epoch ends the run before the final validation). In float32 the two criteria's
gradients agree to float32 rounding (~1e-7), and the first optimizer step that changes the weights
turns that into near-tie flips of the assignment in later batches: item differences up to ~1e-5 at
once, however small the learning rate. In float64 the same rounding stays far below the tolerance.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before ultralytics is imported: no network, settings in a scratch directory.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="ultralytics-config-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ultralytics import YOLO  # noqa: E402
from ultralytics.models.yolo.detect import DetectionTrainer  # noqa: E402

from detloss.integrations.ultralytics import UltralyticsCriterion, use_detloss  # noqa: E402

IMGSZ = 64
BATCH = 4
EPOCHS = 6
N_TRAIN = 16  # 4 iterations per epoch, 24 in all
RTOL = 1e-5


def write_dataset(root: Path, seed: int = 0) -> Path:
    """Coloured rectangles of two classes on grey, 1-3 per image, and their YOLO label files."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", N_TRAIN), ("val", 2)):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            img = np.full((IMGSZ, IMGSZ, 3), 114, np.uint8)
            rows = []
            for _ in range(int(rng.integers(1, 4))):
                w, h = rng.uniform(0.15, 0.5, 2)
                cx, cy = rng.uniform(w / 2, 1 - w / 2), rng.uniform(h / 2, 1 - h / 2)
                c = int(rng.integers(0, 2))
                x1, y1 = int((cx - w / 2) * IMGSZ), int((cy - h / 2) * IMGSZ)
                x2, y2 = int((cx + w / 2) * IMGSZ), int((cy + h / 2) * IMGSZ)
                img[y1:y2, x1:x2] = (40, 200, 60) if c == 0 else (200, 40, 160)
                rows.append(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
            Image.fromarray(img).save(root / split / "images" / f"{i}.png")
            (root / split / "labels" / f"{i}.txt").write_text("\n".join(rows) + "\n")
    data = root / "data.yaml"
    data.write_text(f"path: {root}\ntrain: train/images\nval: val/images\nnames:\n  0: green\n  1: purple\n")
    return data


class Float64Trainer(DetectionTrainer):
    """ultralytics' detection trainer with the batch's floating tensors in float64."""

    def preprocess_batch(self, batch):
        batch = super().preprocess_batch(batch)
        return {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in batch.items()}


class RunDone(Exception):
    """Raised after the last epoch's schedule step: the run ends before the final validation."""


def train(cfg: str, data: Path, project: Path, with_detloss: bool):
    """Per iteration: the items dict, the loss the trainer backpropagates, the criterion's class
    and its one-to-many weight."""
    record = []

    def on_batch_end(trainer):
        crit = trainer.model.criterion
        record.append(({k: float(v) for k, v in trainer.loss_items.items()}, float(trainer.loss.detach()),
                       type(crit), getattr(crit, "o2m", None)))

    def on_epoch_end(trainer):
        if trainer.epoch + 1 == trainer.epochs:
            raise RunDone

    yolo = YOLO(cfg)
    if with_detloss:
        use_detloss(yolo)
    yolo.add_callback("on_train_batch_end", on_batch_end)
    yolo.add_callback("on_train_epoch_end", on_epoch_end)
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float64)
    try:
        with pytest.raises(RunDone):
            yolo.train(
                trainer=Float64Trainer, data=str(data), epochs=EPOCHS, imgsz=IMGSZ, batch=BATCH, workers=0,
                device="cpu", seed=0, deterministic=True, amp=False, plots=False, val=False, save=False,
                cache=False, mosaic=0.0, pretrained=False, project=str(project),
                name="detloss" if with_detloss else "ultralytics", exist_ok=True, verbose=False,
            )
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    assert next(yolo.trainer.model.parameters()).dtype == torch.float64
    return record


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("synthetic"))


@pytest.mark.parametrize("cfg, names, e2e", [
    ("yolov8n.yaml", ["box_loss", "cls_loss", "dfl_loss"], False),
    ("yolo26n.yaml", ["box_loss", "cls_loss", "l1_loss"], True),
])
def test_training_items_agree(cfg, names, e2e, dataset, tmp_path):
    ref = train(cfg, dataset, tmp_path, with_detloss=False)
    ours = train(cfg, dataset, tmp_path, with_detloss=True)
    assert len(ref) == len(ours) == EPOCHS * N_TRAIN // BATCH >= 20
    assert all(issubclass(r[2], UltralyticsCriterion) for r in ours)
    assert not any(issubclass(r[2], UltralyticsCriterion) for r in ref)
    assert {r[2].__name__ for r in ref} == ({"E2ELoss"} if e2e else {"v8DetectionLoss"})
    worst = 0.0
    for i, ((items_r, loss_r, _, w_r), (items_o, loss_o, _, w_o)) in enumerate(zip(ref, ours)):
        assert list(items_o) == list(items_r) == names, i
        assert w_o == w_r, i  # the same end-to-end weight at every iteration (None: no schedule)
        for k in names:
            rel = abs(items_o[k] - items_r[k]) / max(abs(items_r[k]), 1e-12)
            worst = max(worst, rel)
            assert rel <= RTOL, (i, k, items_o[k], items_r[k])
        assert abs(loss_o - loss_r) <= RTOL * abs(loss_r), (i, loss_o, loss_r)
    if e2e:  # the schedule moved: the one-to-one weight grew epoch by epoch
        assert ref[-1][3] < ref[0][3] == 0.8
    print(f"{cfg}: {len(ref)} iterations, worst relative difference of an item {worst:.2e}")
