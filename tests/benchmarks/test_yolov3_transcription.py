"""The YOLOv3 benchmark's baseline, a transcription of darknet's forward_yolo_layer, reproduces the
darknet reference data: its delta (minus the gradient) for every layer of every case, and the
cost darknet prints (the sum of the squared deltas).

Reference: tests/data/darknet (copied from /work/shared/reference/darknet), SOURCE: pjreddie/darknet
commit f6afaabc, src/yolo_layer.c forward_yolo_layer (with box.c, activations.c, blas.c), compiled
for CPU with gcc -O0 -ffp-contract=off and driven by a small harness; float32 arithmetic as in darknet.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from detloss_bench.yolov3 import darknet_layer_delta, truths_from_rows

DATA = Path(__file__).resolve().parents[1] / "data" / "darknet"
CASES = sorted(p.name for p in DATA.glob("dn_*.npz"))


def _load(name):
    d = np.load(DATA / name)
    return d, json.loads(str(d["config"]))


def test_cases_present():
    assert len(CASES) == 10


@pytest.mark.parametrize("name", CASES)
def test_transcription_equals_darknet(name):
    d, cfg = _load(name)
    anchors = [tuple(cfg["anchors"][k:k + 2]) for k in range(0, len(cfg["anchors"]), 2)]
    truth = torch.from_numpy(d["truth"])
    for k, layer in enumerate(cfg["layers"]):
        delta = darknet_layer_delta(torch.from_numpy(d[f"input{k}"]), truth, anchors, layer["mask"], cfg["net_w"],
                                    cfg["net_h"], cfg["classes"], cfg["ignore_thresh"], cfg["truth_thresh"])
        want = torch.from_numpy(d[f"delta{k}"])
        assert delta.shape == want.shape
        torch.testing.assert_close(delta, want, rtol=1e-4, atol=2e-6, msg=f"{name} layer {k}")
        assert np.isclose(float((delta.double() ** 2).sum()), float(d[f"cost{k}"]), rtol=1e-4)


def test_truths_from_rows_keeps_row_order_per_image():
    rows = torch.tensor([[1, 2, 0.5, 0.5, 0.1, 0.2], [0, 1, 0.3, 0.4, 0.2, 0.2], [1, 0, 0.6, 0.7, 0.3, 0.1]])
    t = truths_from_rows(rows, 2)
    assert t.shape == (2, 90, 5)
    assert t[0, 0].tolist() == pytest.approx([0.3, 0.4, 0.2, 0.2, 1])
    assert t[1, :2].tolist() == [pytest.approx([0.5, 0.5, 0.1, 0.2, 2]), pytest.approx([0.6, 0.7, 0.3, 0.1, 0])]
    assert not t[0, 1:].any() and not t[1, 2:].any()
