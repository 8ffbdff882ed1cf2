"""``detloss train``: a few steps of every loss write every output file; training decreases the
loss; runs are deterministic by seed; bad arguments and data give clear errors; 2 ranks (gloo, DDP)."""
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from detloss.tools.cli import main

TINY = ["--img-size", "64", "--batch-size", "4", "--val-images", "4", "--no-progress", "--threads", "1"]
FILES = ("metrics.json", "loss_curves.png", "predictions.png", "assignment.png", "weights.pt")


def _train(tmp_path, *extra, name="run"):
    code = main(["train", *TINY, "--project", str(tmp_path), "--name", name, *extra])
    return code, tmp_path / name


@pytest.mark.parametrize("loss", ["yolov5", "yolov3", "fcos", "yolov8"])
def test_a_few_steps_write_every_output(tmp_path, loss):
    code, out = _train(tmp_path, "--loss", loss, "--steps", "3")
    assert code == 0
    for f in FILES:
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    m = json.loads((out / "metrics.json").read_text())
    assert m["loss"] == loss and m["steps"] == 3 and m["world_size"] == 1
    assert 0.0 <= m["map50"] <= 1.0 and 0.0 <= m["map50_95"] <= m["map50"]
    assert set(m["ap50_per_class"]) == {"circle", "square", "triangle"}
    assert len(m["history"]["total"]) == 3 and all(np.isfinite(m["history"]["total"]))
    assert set(m["final_loss"]) <= set(m["history"])
    with Image.open(out / "predictions.png") as im:
        assert im.size[0] > 64 * 2 and im.size[1] >= 64 * 2


def _fixed_dataset(root):
    """Four images with the same two boxes: the same data every step, so the loss must fall."""
    from detloss.tools.demo.data import SyntheticShapes

    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ds = SyntheticShapes(4, 64, seed=5, max_objects=3, min_size=12, max_size=30)
    for i in range(4):
        img, lab = ds[i]
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / "images" / f"{i}.png")
        (root / "labels" / f"{i}.txt").write_text("".join(f"{int(r[0])} {r[1]} {r[2]} {r[3]} {r[4]}\n" for r in lab.tolist()))
    (root / "classes.txt").write_text("circle\nsquare\ntriangle\n")
    return root


def test_training_decreases_the_loss(tmp_path):
    data = _fixed_dataset(tmp_path / "data")
    code, out = _train(tmp_path, "--data", str(data), "--steps", "30", "--warmup", "3", "--lr", "1e-2")
    assert code == 0
    h = json.loads((out / "metrics.json").read_text())["history"]
    first, last = np.mean(h["total"][:5]), np.mean(h["total"][-5:])
    assert last < 0.7 * first, (first, last)
    for key in ("box", "obj"):
        assert np.mean(h[key][-5:]) < np.mean(h[key][:5]), key


def test_runs_are_deterministic_by_seed(tmp_path):
    _, a = _train(tmp_path, "--steps", "3", "--seed", "7", name="a")
    _, b = _train(tmp_path, "--steps", "3", "--seed", "7", name="b")
    _, c = _train(tmp_path, "--steps", "3", "--seed", "8", name="c")
    ha, hb, hc = (json.loads((d / "metrics.json").read_text())["history"] for d in (a, b, c))
    assert ha == hb
    assert ha["total"] != hc["total"]


def test_minutes_budget_stops_early(tmp_path):
    code, out = _train(tmp_path, "--steps", "100000", "--minutes", "0.002")
    assert code == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] < 100000


@pytest.mark.parametrize(
    "args, message",
    [
        (["--steps", "0"], "--steps: expected a positive number"),
        (["--img-size", "100"], "--img-size: expected a multiple of 32"),
        (["--ema", "1.5"], r"--ema: expected a decay in \[0, 1\)"),
        (["--data", "/no/such/folder"], "/no/such/folder does not exist"),
        (["--lr", "nan"], "--lr: expected a positive finite learning rate, got nan"),
        (["--lr", "0"], "--lr: expected a positive"),
        (["--weight-decay", "inf"], "--weight-decay: expected a finite number >= 0"),
        (["--width", "0"], "--width: expected a positive finite channel multiplier"),
        (["--minutes", "nan"], "--minutes: expected a positive number"),
        (["--img-size", "65536"], "--img-size: expected at most 4096 pixels"),
        (["--seed", "-1"], "--seed: expected a seed >= 0"),
        (["--warmup", "-5"], "--warmup: expected a number of steps >= 0"),
        (["--val-images", "0"], "--val-images: expected a positive number of images"),
        (["--images", "/tmp"], "--images: applies to a COCO json"),
    ],
)
def test_bad_arguments_give_a_clear_error(tmp_path, capsys, args, message):
    code, out = _train(tmp_path, *args)
    assert code == 2
    err = capsys.readouterr().err
    assert re.search(message, err)
    assert len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def _no_training(monkeypatch):
    """Make any model construction fail loudly: the errors must come before training starts."""
    import detloss.tools.demo.train as train

    def boom(*a, **k):
        raise AssertionError("training started")

    monkeypatch.setattr(train, "Detector", boom)


def test_files_that_are_not_images_stop_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    data = _fixed_dataset(tmp_path / "data")
    (data / "images" / "notes.jpg").write_text("these are notes, not a picture")
    code, out = _train(tmp_path, "--data", str(data))
    err = capsys.readouterr().err
    assert code == 2 and "notes.jpg: cannot read the image" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def _coco_json(tmp_path, n=3, categories=True):
    from detloss.tools.demo.data import SyntheticShapes

    ds = SyntheticShapes(n, 64, seed=2)
    doc = {"images": [], "annotations": [],
           "categories": [{"id": 3, "name": "c"}, {"id": 1, "name": "a"}, {"id": 2, "name": "b"}] if categories else []}
    for i in range(n):
        img, lab = ds[i]
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(tmp_path / f"{i}.png")
        doc["images"].append({"id": i, "file_name": f"{i}.png", "width": 64, "height": 64})
        for c, cx, cy, w, h in lab.tolist() if categories else []:
            doc["annotations"].append({"id": len(doc["annotations"]), "image_id": i, "category_id": int(c) + 1,
                                       "bbox": [(cx - w / 2) * 64, (cy - h / 2) * 64, w * 64, h * 64]})
    (tmp_path / "ann.json").write_text(json.dumps(doc))
    return doc


def test_coco_with_a_missing_image_stops_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    _coco_json(tmp_path)
    (tmp_path / "1.png").unlink()
    code, out = _train(tmp_path, "--data", str(tmp_path / "ann.json"))
    err = capsys.readouterr().err
    assert code == 2 and "1.png does not exist" in err and "images[1]" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_coco_without_categories_stops_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    _coco_json(tmp_path, categories=False)
    code, out = _train(tmp_path, "--data", str(tmp_path / "ann.json"))
    err = capsys.readouterr().err
    assert code == 2 and "at least one category under 'categories'" in err
    assert not out.exists()


def test_unwritable_project_stops_before_training(tmp_path, capsys, monkeypatch):
    _no_training(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = main(["train", *TINY, "--project", str(blocker / "sub"), "--name", "run"])
    err = capsys.readouterr().err
    assert code == 2 and "--project: cannot create the run folder" in err and "is not a folder" in err


def test_malformed_label_stops_before_training(tmp_path, capsys):
    data = _fixed_dataset(tmp_path / "data")
    (data / "labels" / "2.txt").write_text("0 0.5 0.5 0.2 0.2\n0 0.5 0.5 1.2\n")
    code, _ = _train(tmp_path, "--data", str(data))
    assert code == 2
    assert f"{data / 'labels' / '2.txt'}:2: expected 5 values" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_ranks_ddp_gloo(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "detloss", "train", *TINY, "--steps", "3", "--loss", "fcos",
           "--project", str(tmp_path), "--name", "ddp"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    m = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["steps"] == 3
    assert all(np.isfinite(m["history"]["total"]))
    for f in FILES:
        assert (tmp_path / "ddp" / f).is_file()


def test_trains_on_a_coco_json(tmp_path):
    doc = _coco_json(tmp_path)
    code, out = _train(tmp_path, "--data", str(tmp_path / "ann.json"), "--steps", "2", "--loss", "yolov8")
    assert code == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["classes"] == ["a", "b", "c"] and m["val_images"] == 3
    assert m["val_objects"] == len(doc["annotations"])
