"""detloss.integrations.ultralytics.SegmentationLoss against ultralytics' v8SegmentationLoss /
SegmentLoss26 / E2ELoss(SegmentLoss26), built from strict stand-in models that allow only the reads
ultralytics' criteria make (overlap masks on and off, masks at 1x and 2x the prototypes).

Reference data: tests/data/ultralytics_tasks (seg01..seg04), whose manifest's SOURCE line reads:
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
from detloss.losses.segment import YOLO26SegmentLoss, YOLOv8SegmentLoss
from reference_cases import case_names, check_dropin_case, check_reads, load_case, task_batch, task_preds
from ultralytics_models import minimal_model

FOLDER = "ultralytics_tasks"
SEG = case_names(FOLDER, "seg*.npz")


@pytest.mark.parametrize("name", SEG)
def test_matches_ultralytics(name):
    crit, model = check_dropin_case(du.SegmentationLoss, name)
    _, cfg = load_case(FOLDER, name)
    check_reads(model, cfg)
    want = YOLO26SegmentLoss if cfg["model"]["head"]["type"] == "Segment26" else YOLOv8SegmentLoss
    branches = [crit.loss] if crit.form == "single" else [crit.loss.one2many, crit.loss.one2one]
    assert all(isinstance(b, want) for b in branches)


def test_eval_mode_tuple():
    check_dropin_case(du.SegmentationLoss, SEG[0], wrap_preds=True)


def test_bad_input():
    arrays, cfg = load_case(FOLDER, "seg01_v8_overlap_proto32.npz")
    torch.set_default_dtype(torch.float64)
    try:
        crit = du.SegmentationLoss(minimal_model(cfg["model"], "segment"))
        preds, _ = task_preds(arrays, cfg)
        batch = task_batch(arrays)
        with pytest.raises(ValueError, match=r"masks: expected the image's aspect ratio 128:128 \(Hm \* W == Wm \* H\), got size \(32, 16\)"):
            crit(preds, {**batch, "masks": batch["masks"][..., :16]})
        with pytest.raises(ValueError, match=r"masks: expected shape \[1, Hm, Wm\]"):
            crit(preds, {**batch, "masks": batch["masks"].repeat(2, 1, 1)})
        with pytest.raises(ValueError, match=r"preds\['mask_coefficient'\]: expected shape \[B, 32 \(the prototypes' nm\), A\], got \(1, 16, 336\)"):
            crit({**preds, "mask_coefficient": preds["mask_coefficient"][:, :16]}, batch)
        with pytest.raises(ValueError, match=r"preds\['proto'\]: expected the prototypes alone \(a Segment head\), got a tuple"):
            crit({**preds, "proto": (preds["proto"], torch.zeros(1, 3, 16, 16))}, batch)
        with pytest.raises(ValueError, match=r"preds: expected a 'proto' entry"):
            crit({k: v for k, v in preds.items() if k != "proto"}, batch)
        with pytest.raises(ValueError, match=r"preds\['scores'\]: expected shape \[B, 3 \(nc 3\), A\], got \(1, 2, 336\)"):
            crit({**preds, "scores": preds["scores"][:, :2]}, batch)
        with pytest.raises(ValueError, match=r"preds\['boxes'\]: expected shape \[B, 64 \(4 \* reg_max 16\), A\], got \(1, 4, 336\)"):
            crit({**preds, "boxes": preds["boxes"][:, :4]}, batch)
    finally:
        torch.set_default_dtype(torch.float32)


def test_bad_input_segment26():
    """Segment26 (end to end, float32 as ultralytics runs it): the semantic logits' classes, the
    prototypes' form, the semantic and instance masks' sizes."""
    arrays, cfg = load_case(FOLDER, "seg03_y26_E2ELoss_overlap.npz")
    crit = du.SegmentationLoss(minimal_model(cfg["model"], "segment"))
    preds, _ = task_preds(arrays, cfg)
    batch = task_batch(arrays)
    m = preds["one2many"]
    proto, semantic = m["proto"]
    with pytest.raises(ValueError, match=r"semantic: expected shape \[2, 3, h, w\], got \(2, 2, 8, 8\)"):
        crit({**preds, "one2many": {**m, "proto": (proto, semantic[:, :2])}}, batch)
    with pytest.raises(ValueError, match=r"preds\['proto'\]: expected \(prototypes, semantic logits\) from a Segment26 head, got a tensor"):
        crit({**preds, "one2many": {**m, "proto": proto}}, batch)
    with pytest.raises(ValueError, match=r"sem_masks: expected shape \(2, 16, 16\) \(one class map per image, the size of masks\), got \(2, 14, 16\)"):
        crit(preds, {**batch, "sem_masks": batch["sem_masks"][:, :14]})
    with pytest.raises(ValueError, match=r"masks: expected the image's aspect ratio 64:64 \(Hm \* W == Wm \* H\), got size \(14, 16\)"):
        crit(preds, {**batch, "masks": batch["masks"][:, :14]})
    with pytest.raises(ValueError, match=r"masks: expected shape \[2, Hm, Wm\] \(one instance-index map per image \(overlap_masks\)\), got \(1, 16, 16\)"):
        crit(preds, {**batch, "masks": batch["masks"][:1]})
    with pytest.raises(ValueError, match=r"preds\['mask_coefficient'\]: expected shape \[B, 32 \(the prototypes' nm\), A\]"):
        crit({**preds, "one2one": {**preds["one2one"], "mask_coefficient": preds["one2one"]["mask_coefficient"][:, :8]}}, batch)
