"""Smoke tests of the ``yolo26`` and ``ultralytics_tasks`` benchmark suites at ``--quick`` sizes in
the main environment, where ultralytics is not installed: detloss's drop-in criteria are built
from the suites' stand-in models and their own figures printed, the peer said missing; ``--peers``
makes that an error. (integration_tests/test_ultralytics_bench.py runs them against ultralytics.)"""
from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from detloss_bench import _ultralytics as bu
from detloss_bench import ultralytics_tasks, yolo26

QUICK = ["--quick", "--threads", "1"]


@pytest.fixture(autouse=True)
def _one_thread():
    yield
    torch.set_num_threads(1)


@pytest.mark.parametrize("cfg", ["yolo26n.yaml", "yolov8n.yaml"])
def test_yolo26_suite_without_ultralytics(cfg, capsys, tmp_path):
    assert importlib.util.find_spec("ultralytics") is None  # the main environment never has it
    path = tmp_path / "r.json"
    assert yolo26.main(QUICK + ["--cfg", cfg, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    form = "e2e" if cfg == "yolo26n.yaml" else "single"
    assert f"detloss DetectionLoss ({form}) against ultralytics {bu.HEADS[cfg][3]}" in out
    assert "peer missing: " in out and "fwd+bwd" in out and "scaling 2 -> 5 boxes/img" in out
    doc = json.loads(path.read_text())
    assert [r["boxes"] for r in doc["rows"]] == [2, 5] and all(r["peer"] is None for r in doc["rows"])
    assert all(r["detloss"]["fwd_bwd_s"] > 0 for r in doc["rows"])


def test_task_suite_without_ultralytics(capsys, tmp_path):
    assert ultralytics_tasks.main(QUICK + ["--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("peer missing: ") == 6 and len(re.findall(r"^ +5 +fwd\+bwd ", out, re.M)) == 6
    for form, peer in (("e2e", "E2ELoss(PoseLoss26)"), ("single", "v8SegmentationLoss"), ("e2e", "E2ELoss(v8OBBLoss)")):
        assert f"({form}) against ultralytics {peer}" in out
    docs = [json.loads(p.read_text()) for p in sorted(tmp_path.iterdir())]
    assert len(docs) == 6 and all(d["rows"][0]["detloss"]["fwd_bwd_s"] > 0 for d in docs)


@pytest.mark.parametrize("main", [yolo26.main, ultralytics_tasks.main])
def test_peers_option_requires_ultralytics(main, capsys):
    assert main(QUICK + ["--peers", "--boxes", "2"]) == 2
    assert "make bench-peers" in capsys.readouterr().err


def test_stand_in_flow_and_heads():
    pose = bu.stand_in_model("yolo26n-pose.yaml", "pose", 1)
    assert bu.describe(pose) == {"classes": ("Pose26", "Pose", "Detect"), "stride": (8.0, 16.0, 32.0), "nc": 1,
                                 "reg_max": 1, "e2e": True, "kpt_shape": [17, 3], "flow": "RealNVP"}
    assert len(bu.flow_parameters(pose)) > 0 and bu.flow_parameters(bu.stand_in_model("yolov8n-pose.yaml", "pose", 1)) == []
    with pytest.raises(SystemExit, match="--cfg yolo11n.yaml"):
        bu.stand_in_model("yolo11n.yaml", "detect", 3)
