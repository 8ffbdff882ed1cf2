"""RetinaNetLoss against torchvision's RetinaNet.compute_loss, case by case.

Reference data: tests/data/torchvision_anchor/ (retina_*.npz), whose manifest's SOURCE line reads:
"torchvision 0.29.1+cu130 with torch 2.14.1+cu130 (numpy 2.4.6, Python 3.11.7), run unmodified on
CPU in float64: torchvision/models/detection/retinanet.py RetinaNet.compute_loss (box_iou ->
_utils.Matcher with allow_low_quality_matches) -> RetinaNetHead.compute_loss
(RetinaNetClassificationHead: ops.sigmoid_focal_loss; RetinaNetRegressionHead: _utils._box_loss with
BoxCoder, bbox_reg_loss_type l1 | smooth_l1 | giou | diou | ciou), anchors from
anchor_utils.AnchorGenerator (RetinaNet's default: 3 sizes x 3 aspect ratios on P3..P7); ..."
"""
from __future__ import annotations

import pytest
import torch

from detloss.anchor_generators import AnchorGenerator
from detloss.assign.iou_matcher import assign_iou
from detloss.box_coder import BoxCoder
from torchvision_anchor_cases import RETINA_CASES, close, load, loss_of, run_case, targets_of

def test_every_retinanet_case_is_here():
    assert len(RETINA_CASES) == 16


@pytest.mark.parametrize("name", RETINA_CASES)
def test_losses_gradients_and_matches(name):
    d, cfg, out, grad_cls, grad_box = run_case(name)
    assert set(out.terms) == {"cls", "box"}
    close(grad_cls, d["grad_cls_logits"], "grad cls_logits")
    close(grad_box, d["grad_bbox_regression"], "grad bbox_regression")
    assert out.stats["num_pos_per_image"] == d["num_foreground_per_image"].tolist()
    assert out.stats["num_pos"] == int(d["num_foreground_per_image"].sum())
    assert out.stats["num_ignored"] == int((d["matched_idxs"] == -2).sum())


@pytest.mark.parametrize("name", RETINA_CASES)
def test_assignment_in_torchvision_order(name):
    d, cfg = load(name)
    asg = assign_iou(
        targets_of(d), d["anchors"], fg_iou_thresh=cfg["fg_iou_thresh"], bg_iou_thresh=cfg["bg_iou_thresh"],
        allow_low_quality_matches=cfg["allow_low_quality_matches"],
    )
    assert torch.equal(torch.stack((asg.batch_index, asg.pred_index), 1), d["fg_index"])
    assert torch.equal(asg.boxes, d["fg_gt_boxes"])
    # Each anchor's best IoU, reported where it reaches the lower threshold.
    ref = d["anchor_max_iou"]
    assert torch.equal(asg.extras["max_iou"], torch.where(ref >= cfg["bg_iou_thresh"], ref, torch.zeros_like(ref)))
    if cfg["allow_low_quality_matches"]:
        # Low-quality positives are candidates of the rule and below the foreground threshold.
        lq = asg.extras["low_quality"]
        assert not (lq & ~d["low_quality_candidate"]).any()
        assert (d["anchor_max_iou"][lq] < cfg["fg_iou_thresh"]).all()
        assert int(lq.sum()) == cfg["num_low_quality_foreground"]


@pytest.mark.parametrize("name", RETINA_CASES)
def test_anchor_generator(name):
    d, cfg = load(name)
    gen = AnchorGenerator(cfg["anchor_sizes"], cfg["aspect_ratios"])
    sizes = d["feature_sizes"].tolist()
    image = d["padded_image_size"].tolist()
    assert torch.equal(gen(sizes, image, dtype=torch.float64), d["anchors"])
    assert torch.equal(torch.stack(gen.cell_anchors).double(), d["cell_anchors"])
    assert gen.num_anchors_per_level(sizes) == d["num_anchors_per_level"].tolist()
    assert gen.strides(sizes, image) == [tuple(s) for s in d["effective_strides"].tolist()]


@pytest.mark.parametrize("name", RETINA_CASES)
def test_box_coder(name):
    d, cfg = load(name)
    coder = BoxCoder(cfg["bbox_reg_weights"], cfg["bbox_xform_clip"])
    fg = d["fg_index"]
    if "fg_target_regression" in d:
        close(coder.encode(d["fg_gt_boxes"], d["fg_anchor_boxes"]), d["fg_target_regression"])
    if "fg_decoded_boxes" in d:
        codes = d["bbox_regression"][fg[:, 0], fg[:, 1]]
        close(coder.decode(codes, d["fg_anchor_boxes"]), d["fg_decoded_boxes"])


def test_per_image_sums():
    # The per-image focal and box sums behind the normalization, for the crowded mixed batch.
    d, cfg = load("retina_09_mixed_empty_crowded.npz")
    loss_fn = loss_of(cfg)
    for i in range(d["cls_logits"].shape[0]):
        one = {k: v[i : i + 1] for k, v in d.items() if k in ("cls_logits", "bbox_regression")}
        out = loss_fn(one["cls_logits"], one["bbox_regression"], d["anchors"], targets_of(d)[i : i + 1])
        n = max(1, int(d["num_foreground_per_image"][i]))
        close(out.components["cls"] * n, d["focal_sum_per_image"][i])
        close(out.components["box"] * n, d["box_loss_sum_per_image"][i])
