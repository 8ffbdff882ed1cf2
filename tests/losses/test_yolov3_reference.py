"""YOLOv3Loss against the original implementations, every reference case.

darknet flavor: tests/data/darknet/ (copied from the shared reference folder), whose manifest's
SOURCE line reads: "pjreddie/darknet commit f6afaabc, src/yolo_layer.c forward_yolo_layer (with
box.c, activations.c, blas.c), compiled for CPU with gcc -O0 -ffp-contract=off and driven by a
small harness; float32 arithmetic as in darknet."
Checked: the gradient of ``total`` w.r.t. every layer input equals minus darknet's ``delta``,
and the per-layer stats equal darknet's printed figures.

pytorch-yolov3 flavor: tests/data/pytorch_yolov3/, whose manifest's SOURCE line reads:
"eriklindernoren/PyTorch-YOLOv3 commit d1041e0 (2019-04-26): models.py YOLOLayer.forward and
utils/utils.py build_targets, the code seed 003 discusses; run on CPU in float32 with
torch.ByteTensor mapped to BoolTensor (uint8 masks no longer index tensors)."
Checked: loss, gradient w.r.t. the raw input, every metric.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from detloss import YOLOv3Loss

DATA = Path(__file__).resolve().parents[1] / "data"
DN_CASES = sorted(p.name for p in (DATA / "darknet").glob("dn_*.npz"))
PV3_CASES = sorted(p.name for p in (DATA / "pytorch_yolov3").glob("pv3_*.npz"))
DN_MANIFEST = {c["file"]: c for c in json.loads((DATA / "darknet" / "manifest.json").read_text())["cases"]}


def test_all_cases_present():
    for folder, cases in (("darknet", DN_CASES), ("pytorch_yolov3", PV3_CASES)):
        manifest = json.loads((DATA / folder / "manifest.json").read_text())
        assert sorted(c["file"] for c in manifest["cases"]) == cases and cases


def _darknet_case(name):
    d = np.load(DATA / "darknet" / name)
    cfg = json.loads(str(d["config"]))
    rows = []
    for b in range(cfg["batch"]):
        for x, y, w, h, c in d["truth"][b]:
            if x == 0:  # darknet's end of list
                break
            rows.append([b, c, x, y, w, h])
    targets = torch.tensor(np.array(rows, dtype=np.float32).reshape(-1, 6))
    assert [int((targets[:, 0] == b).sum()) for b in range(cfg["batch"])] == DN_MANIFEST[name]["nboxes"]
    loss_fn = YOLOv3Loss(
        cfg["classes"],
        anchors=np.array(cfg["anchors"]).reshape(-1, 2).tolist(),
        masks=[layer["mask"] for layer in cfg["layers"]],
        strides=[layer["stride"] for layer in cfg["layers"]],
        img_size=(cfg["net_h"], cfg["net_w"]),
        ignore_thresh=cfg["ignore_thresh"],
        truth_thresh=cfg["truth_thresh"],
        flavor="darknet",
    )
    inputs = [torch.tensor(d[f"input{i}"], requires_grad=True) for i in range(len(cfg["layers"]))]
    return d, cfg, loss_fn, inputs, targets


@pytest.mark.parametrize("name", DN_CASES)
def test_darknet_gradient_is_minus_delta(name):
    d, cfg, loss_fn, inputs, targets = _darknet_case(name)
    out = loss_fn(inputs, targets)
    out.total.backward()
    for i, x in enumerate(inputs):
        delta = torch.from_numpy(d[f"delta{i}"])
        torch.testing.assert_close(-x.grad, delta, rtol=1e-4, atol=1e-6, msg=f"layer {i}")
    # the components add up to the total, and darknet's cost is the gradient's squared norm
    assert math.isclose(sum(out.items().values()), float(out.total.detach()), rel_tol=1e-5)
    for i, x in enumerate(inputs):
        assert math.isclose(float((x.grad.double() ** 2).sum()), float(d[f"cost{i}"]), rel_tol=1e-4)


@pytest.mark.parametrize("name", DN_CASES)
def test_darknet_stats_are_printed_figures(name):
    _, cfg, loss_fn, inputs, targets = _darknet_case(name)
    out = loss_fn(inputs, targets)
    assert len(out.stats["layers"]) == len(cfg["layers"])
    for layer, got in zip(cfg["layers"], out.stats["layers"]):
        for key, want in layer["stats"].items():
            if key == "count":
                assert got[key] == want
            elif math.isnan(want):
                assert got[key] is None, key
            else:  # darknet prints %f: 6 decimals
                assert got[key] == pytest.approx(want, abs=1.5e-6, rel=1e-5), key


def test_darknet_references_exercise_the_branches():
    """The cases cover what the semantics hinge on: ignored predictions, the truth_thresh branch,
    two truths written in the same cell and anchor."""
    seen = {"ignored": 0, "thresh": 0, "shared_cell": 0}
    from detloss.assign.darknet import assign_darknet

    for name in DN_CASES:
        _, cfg, loss_fn, inputs, targets = _darknet_case(name)
        for a in assign_darknet(inputs, targets, loss_fn.anchors, loss_fn.masks, loss_fn.img_size,
                                loss_fn.ignore_thresh, loss_fn.truth_thresh):
            seen["ignored"] += int((a.ignore & ~a.positive).sum())
            seen["thresh"] += int(a.thresh.sum())
            cells = torch.stack((a.image, a.anchor, a.gy, a.gx), 1)
            seen["shared_cell"] += cells.shape[0] - torch.unique(cells, dim=0).shape[0]
    assert all(v > 0 for v in seen.values()), seen


def _pv3_case(name):
    d = np.load(DATA / "pytorch_yolov3" / name)
    cfg = json.loads(str(d["config"]))
    loss_fn = YOLOv3Loss(
        cfg["nc"],
        anchors=cfg["anchors"],
        masks=[(0, 1, 2)],
        strides=[cfg["stride"]],
        img_size=cfg["img_dim"],
        ignore_thresh=cfg["ignore_thres"],
        flavor="pytorch-yolov3",
        obj_scale=cfg["obj_scale"],
        noobj_scale=cfg["noobj_scale"],
    )
    return d, cfg, loss_fn


@pytest.mark.parametrize("name", PV3_CASES)
def test_pytorch_yolov3_loss_gradient_metrics(name):
    d, cfg, loss_fn = _pv3_case(name)
    x = torch.tensor(d["x"], requires_grad=True)
    out = loss_fn([x], torch.tensor(d["targets"]))
    out.total.backward()
    assert float(out.total.detach()) == pytest.approx(float(d["loss"]), rel=1e-5)
    torch.testing.assert_close(x.grad, torch.from_numpy(d["grad_x"]), rtol=1e-4, atol=1e-7)
    metrics = json.loads(str(d["metrics"]))
    got = out.stats["layers"][0]
    for key, want in metrics.items():
        if key == "grid_size":
            assert got[key] == (cfg["grid"], cfg["grid"])
        else:
            assert got[key] == pytest.approx(want, rel=1e-5, abs=1e-6), key
    assert float(out.components["xy"]) == pytest.approx(metrics["x"] + metrics["y"], rel=1e-5)
    assert float(out.components["wh"]) == pytest.approx(metrics["w"] + metrics["h"], rel=1e-5)
    assert float(out.components["obj"] + out.components["noobj"]) == pytest.approx(metrics["conf"], rel=1e-5)
    assert float(out.components["cls"]) == pytest.approx(metrics["cls"], rel=1e-5)
