"""SSDLoss against torchvision's SSD.compute_loss (matching, hard negative mining), case by case.

Reference data: tests/data/torchvision_anchor/ (ssd_*.npz), whose manifest's SOURCE line reads:
"torchvision 0.29.1+cu130 with torch 2.14.1+cu130 (numpy 2.4.6, Python 3.11.7), run unmodified on
CPU in float64: ... ssd.py SSD.forward in training mode with a stub backbone and head (its matching
loop: box_iou -> _utils.SSDMatcher) -> SSD.compute_loss (smooth L1 with BoxCoder weights 10, 10, 5,
5; cross-entropy with hard negative mining), default boxes from anchor_utils.DefaultBoxGenerator
(SSD300, SSDlite320 and smaller configurations)."

Where the mining cut-off falls inside a group of equal losses (``mined_tie_dependent``), which of
the tied rows torchvision's unstable sort mines is arbitrary: there the number of mined rows and
the multiset of their gradients are compared (the tied rows have identical logits).
"""
from __future__ import annotations

import pytest
import torch

from detloss.anchor_generators import DefaultBoxGenerator
from detloss.assign.iou_matcher import assign_ssd
from detloss.box_coder import BoxCoder
from detloss.losses.ssd import mine_hard_negatives
from torchvision_anchor_cases import SSD_CASES, close, load, run_case, targets_of

def test_every_ssd_case_is_here():
    assert len(SSD_CASES) == 9


@pytest.mark.parametrize("name", SSD_CASES)
def test_losses_gradients_and_matches(name):
    d, cfg, out, grad_cls, grad_box = run_case(name)
    close(grad_box, d["grad_bbox_regression"], "grad bbox_regression")
    tied = d["mined_tie_dependent"]
    mined = out.stats["mined"]
    assert torch.equal(mined[~tied], d["mined_mask"][~tied])
    close(grad_cls[~tied], d["grad_cls_logits"][~tied], "grad cls_logits outside ties")
    for i in range(tied.shape[0]):
        t = tied[i]
        assert int(mined[i][t].sum()) == int(d["mined_mask"][i][t].sum())
        ours = grad_cls[i][t].sort(0).values
        ref = d["grad_cls_logits"][i][t].sort(0).values
        close(ours, ref, "grad cls_logits on tied rows, as a set")
    assert out.stats["num_mined"] == int(d["mined_mask"].sum())
    assert out.stats["normalizer"] == max(1.0, float((d["matched_idxs"] >= 0).sum()))


def test_tie_case_has_ties():
    d, _ = load("ssd_06_matcher_and_mining_ties.npz")
    assert d["mined_tie_dependent"].any(dim=1).all()


@pytest.mark.parametrize("name", SSD_CASES)
def test_mining_alone(name):
    d, cfg = load(name)
    mined = mine_hard_negatives(d["cls_loss"], d["foreground_mask"], cfg["neg_to_pos_ratio"])
    tied = d["mined_tie_dependent"]
    assert torch.equal(mined[~tied], d["mined_mask"][~tied])
    assert mined.sum(1).tolist() == cfg["num_mined_per_image"]


def test_negative_count_in_float32():
    # 27 positives x 0.7/0.3 is 62.999996 in float32: 63 mined where float64 would give 64.
    d, cfg = load("ssd_08_pos_fraction_0.3_iou_0.4.npz")
    assert cfg["num_mined_per_image"][0] == 63
    assert torch.equal(d["num_negative"], (cfg["neg_to_pos_ratio"] * d["foreground_mask"].sum(1)).float())
    mined = mine_hard_negatives(d["cls_loss"], d["foreground_mask"], cfg["neg_to_pos_ratio"])
    assert int(mined[0].sum()) == 63


@pytest.mark.parametrize("name", SSD_CASES)
def test_assignment(name):
    d, cfg = load(name)
    asg = assign_ssd(targets_of(d), d["anchors"], iou_thresh=cfg["iou_thresh"])
    assert torch.equal(torch.stack((asg.batch_index, asg.pred_index), 1), d["fg_index"])
    assert torch.equal(asg.boxes, d["fg_gt_boxes"])
    counts = d["gt_counts"].tolist()
    best = torch.cat([d["gt_best_anchor"][i, :n] for i, n in enumerate(counts)])
    assert torch.equal(asg.extras["best_anchor"], best)
    assert asg.ignore is None


@pytest.mark.parametrize("name", SSD_CASES)
def test_default_boxes_and_coder(name):
    d, cfg = load(name)
    gen = DefaultBoxGenerator(**cfg["anchor_config"])
    sizes, image = d["feature_sizes"].tolist(), d["image_size"].tolist()
    assert torch.equal(gen(sizes, image, dtype=torch.float64), d["anchors"])
    assert torch.equal(gen.default_boxes_cxcywh(sizes, image, dtype=torch.float64), d["default_boxes_cxcywh"])
    assert torch.equal(torch.cat(gen.wh_pairs), d["wh_pairs"])
    assert list(gen.scales) == pytest.approx(cfg["scales"], rel=1e-12)
    assert gen.num_anchors_per_level(sizes) == d["num_anchors_per_level"].tolist()
    coder = BoxCoder(cfg["bbox_reg_weights"])
    close(coder.encode(d["fg_gt_boxes"], d["fg_anchor_boxes"]), d["fg_target_regression"])


def test_ssd300_and_ssdlite320_presets():
    d, _ = load("ssd_01_ssd300_b1_c21.npz")
    assert torch.equal(DefaultBoxGenerator.ssd300()(d["feature_sizes"].tolist(), (300, 300), dtype=torch.float64), d["anchors"])
    d, _ = load("ssd_03_ssdlite320_b1_c6.npz")
    gen = DefaultBoxGenerator.ssdlite320()
    assert torch.equal(gen(d["feature_sizes"].tolist(), (320, 320), dtype=torch.float64), d["anchors"])
