"""detloss.integrations.ultralytics.OBBLoss against ultralytics' v8OBBLoss / E2ELoss(v8OBBLoss), built
from strict stand-in models that allow only the reads ultralytics' criteria make.

Reference data: tests/data/ultralytics_tasks (obb01, obb02), whose manifest's SOURCE line reads:
"ultralytics 8.4.190, files ultralytics/utils/loss.py (v8DetectionLoss, BboxLoss, DFLoss,
E2EDetectLoss, E2ELoss, v8OBBLoss, RotatedBboxLoss, v8PoseLoss, PoseLoss26, KeypointLoss, RLELoss,
v8SegmentationLoss, SegmentLoss26, BCEDiceLoss), utils/tal.py (TaskAlignedAssigner,
RotatedTaskAlignedAssigner, PoseTaskAlignedAssigner, SegTaskAlignedAssigner, make_anchors),
utils/metrics.py (bbox_iou, probiou), nn/tasks.py (init_criterion), nn/modules/head.py and
nn/modules/block.py (heads, RealNVP), run unmodified on CPU with torch 2.14.1+cu130,
torch.set_default_dtype(torch.float64) (float32 for the Segment26 cases)".
"""
from __future__ import annotations

import pytest
import torch

from detloss.integrations import ultralytics as du
from detloss.losses.obb import YOLOv8OBBLoss
from reference_cases import case_names, check_dropin_case, check_reads, load_case, task_batch, task_preds
from ultralytics_models import minimal_model

FOLDER = "ultralytics_tasks"
OBB = case_names(FOLDER, "obb*.npz")


@pytest.mark.parametrize("name", OBB)
def test_matches_ultralytics(name):
    crit, model = check_dropin_case(du.OBBLoss, name)
    check_reads(model, load_case(FOLDER, name)[1])
    branches = [crit.loss] if crit.form == "single" else [crit.loss.one2many, crit.loss.one2one]
    assert all(isinstance(b, YOLOv8OBBLoss) for b in branches)


def test_eval_mode_tuple_and_criterion_for():
    check_dropin_case(du.OBBLoss, OBB[0], wrap_preds=True)
    _, cfg = load_case(FOLDER, OBB[0])
    assert isinstance(du.criterion_for(minimal_model(cfg["model"], "obb")), du.OBBLoss)


def test_bad_input():
    arrays, cfg = load_case(FOLDER, OBB[0])
    torch.set_default_dtype(torch.float64)
    try:
        crit = du.OBBLoss(minimal_model(cfg["model"], "obb"))
        preds, _ = task_preds(arrays, cfg)
        batch = task_batch(arrays)
        with pytest.raises(ValueError, match=r"preds: expected a 'angle' entry"):
            crit({k: v for k, v in preds.items() if k != "angle"}, batch)
        with pytest.raises(ValueError, match=r"preds\['angle'\]: expected shape \[B, 1 \(the angle\), A\], got \(2, 2, 189\)"):
            crit({**preds, "angle": preds["angle"].repeat(1, 2, 1)}, batch)
        with pytest.raises(ValueError, match=r"preds\['scores'\]: expected shape \[B, 3 \(nc 3\), A\], got \(2, 4, 189\)"):
            crit({**preds, "scores": torch.zeros(2, 4, 189)}, batch)
        with pytest.raises(ValueError, match=r"preds\['boxes'\]: expected shape \[B, 64 \(4 \* reg_max 16\), A\]"):
            crit({**preds, "boxes": preds["boxes"][:, :60]}, batch)
        with pytest.raises(ValueError, match=r"batch\['bboxes'\]: expected shape \(10, 5\), got \(10, 4\)"):
            crit(preds, {**batch, "bboxes": batch["bboxes"][:, :4]})
        with pytest.raises(ValueError, match=r"preds\['angle'\]: expected the head's angles in \[-0.785398, 2.35619\] \(angle_range\), got 5.28906"):
            crit({**preds, "angle": preds["angle"].detach() + 3.0}, batch)  # an OBB head's angles are (sigmoid - 1/4) pi
        deg = batch["bboxes"].clone()
        deg[0, 4] = 90.0
        with pytest.raises(ValueError, match=r"targets: expected an angle in radians in \[-pi, pi\]"):
            crit(preds, {**batch, "bboxes": deg})
    finally:
        torch.set_default_dtype(torch.float32)


def test_obb26_head_angles_are_raw():
    """OBB26 heads emit raw angles: no range (ultralytics does not activate them); the box and
    angle terms follow the shifted angles."""
    arrays, cfg = load_case(FOLDER, "obb02_y26_E2ELoss_rm1.npz")
    torch.set_default_dtype(torch.float64)
    try:
        crit = du.OBBLoss(minimal_model(cfg["model"], "obb"))
        preds, _ = task_preds(arrays, cfg)
        shifted = {k: {**v, "angle": v["angle"].detach() + 3.0} for k, v in preds.items()}
        loss, items = crit(shifted, task_batch(arrays))
        assert torch.isfinite(loss).all() and list(items) == cfg["item_names"]
        assert not torch.equal(loss, crit(preds, task_batch(arrays))[0])
    finally:
        torch.set_default_dtype(torch.float32)
