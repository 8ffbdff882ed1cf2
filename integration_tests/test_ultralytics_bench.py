"""The YOLO26 and OBB / pose / segmentation benchmarks against ultralytics' own criteria at
``--quick`` sizes: each runs the peer's code (``--peers``: a missing peer would be an error) and
its equality check (totals, items, gradients of every head output and of the flow's parameters)
passes before anything is timed; the stand-in model the suites use without ultralytics describes
the same heads as the real models."""
from __future__ import annotations

import json

import pytest
import torch

from detloss_bench import _ultralytics as bu
from detloss_bench import ultralytics_tasks, yolo26

QUICK = ["--quick", "--peers", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    yield
    torch.set_num_threads(1)


@pytest.mark.parametrize("cfg, peer", [("yolo26n.yaml", "E2ELoss(v8DetectionLoss)"), ("yolov8n.yaml", "v8DetectionLoss")])
def test_yolo26_suite_checks_against_ultralytics(cfg, peer, capsys, tmp_path):
    path = tmp_path / "r.json"
    assert yolo26.main(QUICK + ["--cfg", cfg, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"peer: ultralytics {peer}, the original's own code" in out
    assert out.count("equal: total rel. diff") == 2 and "fwd+bwd" in out
    doc = json.loads(path.read_text())
    assert doc["peer_missing"] is None and all(r["peer"]["fwd_bwd_s"] > 0 for r in doc["rows"])


def test_task_suite_checks_against_ultralytics(capsys, tmp_path):
    assert ultralytics_tasks.main(QUICK + ["--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    for peer in ("E2ELoss(v8OBBLoss)", "E2ELoss(PoseLoss26)", "E2ELoss(SegmentLoss26)", "v8OBBLoss", "v8PoseLoss",
                 "v8SegmentationLoss"):
        assert f"peer: ultralytics {peer}, the original's own code" in out
    assert out.count("equal: total rel. diff") == 12
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted(f"t.{f}_{t}.json" for f in ("yolo26", "yolov8") for t in ("obb", "pose", "segment"))


@pytest.mark.parametrize("cfg", sorted(bu.HEADS))
def test_stand_in_describes_the_real_head(cfg):
    task = {"obb": "obb", "pose": "pose", "seg": "segment"}.get(cfg.split("-")[-1].split(".")[0], "detect")
    nc = 1 if task == "pose" else 3
    real = bu.real_model(cfg, task, nc)
    assert bu.describe(bu.stand_in_model(cfg, task, nc)) == bu.describe(real)
    assert bu.criterion_name(real.init_criterion()) == bu.HEADS[cfg][3]
