"""detloss.integrations.ultralytics.PoseLoss against ultralytics' v8PoseLoss / PoseLoss26 /
E2ELoss(PoseLoss26), built from strict stand-in models that allow only the reads ultralytics'
criteria make; the Pose26 head carries a detloss.nn.RealNVP loaded with the stored flow state, and
the flow parameters' gradients are compared too.

Reference data: tests/data/ultralytics_tasks (pose01..pose04), whose manifest's SOURCE line reads:
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

import detloss.nn as dnn
from detloss.integrations import ultralytics as du
from detloss.losses.pose import YOLO26PoseLoss, YOLOv8PoseLoss
from reference_cases import case_names, check_dropin_case, check_reads, flow_state, load_case, task_batch, task_preds
from ultralytics_models import HEAD_BASES, minimal_model, reads_of

FOLDER = "ultralytics_tasks"
POSE = case_names(FOLDER, "pose*.npz")


def flow_for(name):
    arrays, _ = load_case(FOLDER, name)
    state = flow_state(arrays)
    if not state:
        return None
    flow = dnn.RealNVP().double()
    flow.load_state_dict(state)
    return flow


def branches(crit):
    return [crit.loss] if crit.form == "single" else [crit.loss.one2many, crit.loss.one2one]


@pytest.mark.parametrize("name", POSE)
def test_matches_ultralytics(name):
    flow = flow_for(name)
    crit, model = check_dropin_case(du.PoseLoss, name, flow=flow)
    _, cfg = load_case(FOLDER, name)
    check_reads(model, cfg)
    want = YOLO26PoseLoss if cfg["model"]["head"]["type"] == "Pose26" else YOLOv8PoseLoss
    assert all(isinstance(b, want) for b in branches(crit))
    if flow is not None:  # both branches evaluate the head's own flow
        assert all(b.flow_model is flow for b in branches(crit))


def test_variant_by_class_names_and_eval_tuple():
    """A head class derived from Pose26 gets PoseLoss26's form; preds may come as (inference, dict)."""
    name = "pose04_y26_PoseLoss26_rle_4kpt.npz"
    HEAD_BASES["MyPose26"] = type("MyPose26", (HEAD_BASES["Pose26"],), {})
    try:
        _, cfg = load_case(FOLDER, name)
        model = minimal_model(cfg["model"], "pose", head={"type": "MyPose26"}, extra_head={"flow_model": flow_for(name)})
        assert isinstance(du.PoseLoss(model).loss, YOLO26PoseLoss)
    finally:
        del HEAD_BASES["MyPose26"]
    check_dropin_case(du.PoseLoss, name, flow=flow_for(name), wrap_preds=True)


def test_pose26_without_flow_has_no_rle_and_reads_no_rle_gain():
    arrays, cfg = load_case(FOLDER, "pose04_y26_PoseLoss26_rle_4kpt.npz")
    torch.set_default_dtype(torch.float64)
    try:
        model = minimal_model(cfg["model"], "pose", extra_head={"flow_model": None})
        crit = du.PoseLoss(model)
        preds, _ = task_preds(arrays, cfg)
        loss, items = crit(preds, task_batch(arrays))
        assert list(items) == cfg["item_names"][:5] and loss.shape == (5,)
        # the other five terms do not depend on the flow: they equal the reference's
        torch.testing.assert_close(loss.detach(), arrays["loss.u0"][:5], rtol=1e-6, atol=1e-9)
        assert "rle" not in reads_of(object.__getattribute__(model, "_fields")["args"])
    finally:
        torch.set_default_dtype(torch.float32)


def test_sigmas_rule():
    _, cfg = load_case(FOLDER, "pose01_v8_17kpt.npz")
    coco = minimal_model(cfg["model"], "pose")
    assert torch.equal(du.PoseLoss(coco).loss.sigmas, dnn.KeypointLoss().sigmas)
    tup = minimal_model(cfg["model"], "pose")
    object.__getattribute__(object.__getattribute__(tup, "_fields")["model"][-1], "_fields")["kpt_shape"] = (17, 3)
    # ultralytics compares kpt_shape == [17, 3]: a tuple selects 1 / K
    torch.testing.assert_close(du.PoseLoss(tup).loss.sigmas, torch.full((17,), 1 / 17))
    bad = dict(cfg["model"], kpt_oks_sigmas=[0.1] * 3)
    with pytest.raises(ValueError, match=r"model.kpt_oks_sigmas: expected 17 positive values \(one per keypoint\)"):
        du.PoseLoss(minimal_model(bad, "pose"))


def test_bad_input():
    arrays, cfg = load_case(FOLDER, "pose01_v8_17kpt.npz")
    torch.set_default_dtype(torch.float64)
    try:
        crit = du.PoseLoss(minimal_model(cfg["model"], "pose"))
        preds, _ = task_preds(arrays, cfg)
        batch = task_batch(arrays)
        with pytest.raises(ValueError, match=r"preds\['kpts'\]: expected shape \[B, 51 \(K \* D = 17 \* 3\), A\], got \(2, 34, 189\)"):
            crit({**preds, "kpts": preds["kpts"][:, :34]}, batch)
        with pytest.raises(ValueError, match=r"keypoints: expected shape \[5, 17, 2 or 3\].*got \(5, 5, 3\)"):
            crit(preds, {**batch, "keypoints": batch["keypoints"][:, :5]})
        with pytest.raises(ValueError, match=r"batch: expected a 'keypoints' entry"):
            crit(preds, {k: v for k, v in batch.items() if k != "keypoints"})
        with pytest.raises(ValueError, match=r"keypoints: expected shape \[5, 17, 2 or 3\].*got \(4, 17, 3\)"):
            crit(preds, {**batch, "keypoints": batch["keypoints"][:4]})
        with pytest.raises(ValueError, match=r"preds\['scores'\]: expected shape \[B, 1 \(nc 1\), A\], got \(2, 2, 189\)"):
            crit({**preds, "scores": preds["scores"].repeat(1, 2, 1)}, batch)
        with pytest.raises(ValueError, match=r"preds\['boxes'\]: expected shape \[B, 64 \(4 \* reg_max 16\), A\], got \(2, 4, 189\)"):
            crit({**preds, "boxes": preds["boxes"][:, :4]}, batch)
    finally:
        torch.set_default_dtype(torch.float32)


def test_bad_input_pose26_with_flow():
    """The one-to-one branch's outputs are checked like the one-to-many's; kpts_sigma is read (and
    checked) because the head has a flow model."""
    name = "pose03_y26_E2ELoss_rle_17kpt.npz"
    arrays, cfg = load_case(FOLDER, name)
    torch.set_default_dtype(torch.float64)
    try:
        crit = du.PoseLoss(minimal_model(cfg["model"], "pose", extra_head={"flow_model": flow_for(name)}))
        preds, _ = task_preds(arrays, cfg)
        batch = task_batch(arrays)
        o2o = preds["one2one"]
        with pytest.raises(ValueError, match=r"preds\['kpts_sigma'\]: expected shape \[B, 34 \(2 \* K = 2 \* 17\), A\], got \(2, 32, 189\)"):
            crit({**preds, "one2one": {**o2o, "kpts_sigma": o2o["kpts_sigma"][:, :32]}}, batch)
        with pytest.raises(ValueError, match=r"preds\['kpts'\]: expected shape \[B, 51 \(K \* D = 17 \* 3\), A\], got \(2, 48, 189\)"):
            crit({**preds, "one2one": {**o2o, "kpts": o2o["kpts"][:, :48]}}, batch)
        with pytest.raises(ValueError, match=r"preds\['boxes'\]: expected shape \[B, 4 \(4 \* reg_max 1\), A\], got \(2, 64, 189\)"):
            crit({**preds, "one2one": {**o2o, "boxes": o2o["boxes"].repeat(1, 16, 1)}}, batch)
        with pytest.raises(ValueError, match=r"keypoints: expected shape \[5, 17, 2 or 3\].*got \(5, 4, 3\)"):
            crit(preds, {**batch, "keypoints": batch["keypoints"][:, :4]})
    finally:
        torch.set_default_dtype(torch.float32)
