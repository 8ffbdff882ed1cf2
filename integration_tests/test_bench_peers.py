"""Every benchmark suite with a real peer runs that peer's own code at tiny sizes here, and its
equality check (values, terms and gradients of detloss and the peer on the same inputs) passes
before anything is timed. ``--peers`` makes a missing peer an error, so this cannot pass by
falling back to detloss's own figures."""
from __future__ import annotations

import json

import pytest
import torch

from detloss_bench import fcos, retinanet, ssd, yolov3, yolov5, yolov8

PEERS = {"yolov5": (yolov5, "yolov5 ComputeLoss"), "yolov8": (yolov8, "ultralytics v8DetectionLoss"),
         "fcos": (fcos, "torchvision FCOS.compute_loss"), "retinanet": (retinanet, retinanet.PEER),
         "ssd": (ssd, ssd.PEER)}


@pytest.mark.parametrize("name", sorted(PEERS))
def test_peer_suite_equality_check_passes(name, capsys, tmp_path):
    module, label = PEERS[name]
    path = tmp_path / "r.json"
    assert module.main(["--quick", "--peers", "--threads", "1", "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"peer: {label}, the original's own code" in out
    assert out.count("equal: total rel. diff") == 2
    doc = json.loads(path.read_text())
    assert doc["peer_missing"] is None and all(r["peer"]["fwd_bwd_s"] > 0 for r in doc["rows"])
    torch.set_num_threads(1)


def test_yolov3_transcription_suite(capsys):
    assert yolov3.main(["--quick", "--peers", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "TRANSCRIPTION" in out and out.count("equal: gradients") == 2


@pytest.mark.parametrize("module", [retinanet, ssd])
def test_anchor_suites_stop_when_the_matches_differ(module, capsys, monkeypatch):
    """The matches are compared exactly before timing: one changed anchor stops the suite (SSD's
    peer loss reads the changed matches too, so its total may be the first thing to differ)."""
    real = module.peer_matches

    def off_by_one(model, targets, anchors):
        out = real(model, targets, anchors)
        out[0] = out[0].clone()
        out[0][0] = out[0][0] + 1
        return out

    monkeypatch.setattr(module, "peer_matches", off_by_one)
    assert module.main(["--quick", "--peers", "--threads", "1", "--boxes", "2"]) == 1
    err = capsys.readouterr().err
    assert "nothing was timed" in err and ("matched_idxs of image 0" in err or " total " in err)
    torch.set_num_threads(1)
