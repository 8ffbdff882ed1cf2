"""Parity of detloss.functional with the original implementations, values and gradients in float64.

Reference data (copied from the shared reference set, manifests beside them):
- tests/data/torchvision_fcos/ops.npz -- SOURCE: torchvision 0.29.1+cu130 with torch 2.14.1+cu130:
  torchvision.ops sigmoid_focal_loss, generalized_box_iou_loss, distance_box_iou_loss,
  complete_box_iou_loss, box_iou, generalized_box_iou; ... Run unmodified on CPU in float64.
- tests/data/yolov5_v7/blocks.npz -- SOURCE: ultralytics/yolov5 tag v7.0 (commit
  915bbf294bb74c859f0b41f1c23bc395014ea679): utils/loss.py ComputeLoss, BCEBlurWithLogitsLoss,
  FocalLoss, QFocalLoss, smooth_BCE; utils/metrics.py bbox_iou. Run unmodified on CPU in float64.
- tests/data/ultralytics/blocks.npz -- SOURCE: ultralytics 8.4.190 (torch 2.14.1+cu130), imported
  unmodified: ultralytics/utils/loss.py ... DFLoss, VarifocalLoss, FocalLoss; ultralytics/utils/
  metrics.py bbox_iou. CPU, float64.
"""
from __future__ import annotations

import pytest
import torch

import detloss.functional as F
from functional_helpers import assert_close, load_npz, t64, value_and_grads

# ----------------------------------------------------------------------------- torchvision
OPS = load_npz("torchvision_fcos", "ops.npz")


@pytest.mark.parametrize("targets", ["binary", "soft"])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_torchvision_sigmoid_focal_loss(targets, alpha, gamma, reduction):
    key = f"focal_{targets}_a{alpha}_g{gamma}_{reduction}"
    x, y = t64(OPS["focal_logits"]), t64(OPS[f"focal_targets_{targets}"])
    out, (gx, _) = value_and_grads(
        lambda a, b: F.sigmoid_focal_loss(a, b, alpha=alpha, gamma=gamma, reduction=reduction), x, y
    )
    assert_close(out, OPS[key], msg=key)
    assert_close(gx, OPS[key + "_grad"], msg=key + "_grad")


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_torchvision_iou_losses(kind, reduction):
    key = f"{kind}_loss_{reduction}"
    b1, b2 = t64(OPS["boxes1"]), t64(OPS["boxes2"])
    out, (g1, g2) = value_and_grads(lambda a, b: F.iou_loss(a, b, kind=kind, reduction=reduction), b1, b2)
    assert_close(out, OPS[key], msg=key)
    assert_close(g1, OPS[key + "_grad1"], msg=key + "_grad1")
    assert_close(g2, OPS[key + "_grad2"], msg=key + "_grad2")


@pytest.mark.parametrize("kind,key", [("iou", "box_iou_matrix"), ("giou", "generalized_box_iou_matrix")])
def test_torchvision_pairwise(kind, key):
    b1, b2 = t64(OPS["boxes1"])[:10], t64(OPS["boxes2"])[:12]
    assert_close(F.pairwise_box_iou(b1, b2, kind=kind), OPS[key], msg=key)


# ----------------------------------------------------------------------------- yolov5 v7.0
V5 = load_npz("yolov5_v7", "blocks.npz")


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
@pytest.mark.parametrize("fmt", ["xywh", "xyxy"])
def test_yolov5_bbox_iou(kind, fmt):
    key = f"bbox_iou_{kind}_{fmt}"
    b1, b2 = t64(V5[f"box1_{fmt}"]), t64(V5[f"box2_{fmt}"])
    box_format = "cxcywh" if fmt == "xywh" else "xyxy"
    out, (g1, g2) = value_and_grads(
        lambda a, b: F.aligned_box_iou(a, b, kind=kind, box_format=box_format, convention="yolov5"), b1, b2
    )
    assert_close(out, V5[key], msg=key)
    assert_close(g1, V5[key + "_grad1"], msg=key + "_grad1")
    assert_close(g2, V5[key + "_grad2"], msg=key + "_grad2")


@pytest.mark.parametrize("targets", ["binary", "soft"])
def test_yolov5_bce_blur(targets):
    key = f"bce_blur_{targets}"
    x, y = t64(V5["logits"]), t64(V5[f"targets_{targets}"])
    out, (gx, _) = value_and_grads(lambda a, b: F.bce_blur(a, b, alpha=0.05), x, y)
    assert_close(out, V5[key], msg=key)
    assert_close(gx, V5[key + "_grad"], msg=key + "_grad")


@pytest.mark.parametrize("targets", ["binary", "soft"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("which", ["focal", "qfocal"])
def test_yolov5_focal_and_qfocal(which, targets, reduction):
    key = f"{which}_{targets}_{reduction}"
    x, y = t64(V5["logits"]), t64(V5[f"targets_{targets}"])
    if which == "focal":
        fn = lambda a, b: F.sigmoid_focal_loss(a, b, alpha=0.25, gamma=1.5, reduction=reduction)  # noqa: E731
    else:
        fn = lambda a, b: F.quality_focal_loss(a, b, gamma=1.5, alpha=0.25, reduction=reduction)  # noqa: E731
    out, (gx, _) = value_and_grads(fn, x, y)
    assert_close(out, V5[key], msg=key)
    assert_close(gx, V5[key + "_grad"], msg=key + "_grad")


def test_yolov5_smooth_bce():
    got = [F.smooth_bce(float(e)) for e in V5["smooth_bce_eps"]]
    assert_close(torch.tensor(got, dtype=torch.float64), V5["smooth_bce"], rtol=0, atol=0)


# ----------------------------------------------------------------------------- ultralytics 8.4
UL = load_npz("ultralytics", "blocks.npz")


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
def test_ultralytics_bbox_iou_xyxy(kind):
    key = f"{kind}_xyxy"
    b1, b2 = t64(UL["iou_boxes1_xyxy"]), t64(UL["iou_boxes2_xyxy"])
    out, (g1, g2) = value_and_grads(lambda a, b: F.aligned_box_iou(a, b, kind=kind, convention="yolov5"), b1, b2)
    assert_close(out, UL[key][:, 0], msg=key)
    assert_close(g1, UL[key + "_grad1"], msg=key + "_grad1")
    assert_close(g2, UL[key + "_grad2"], msg=key + "_grad2")


def test_ultralytics_ciou_xywh():
    b1, b2 = t64(UL["iou_boxes1_xywh"]), t64(UL["iou_boxes2_xywh"])
    out, (g1, g2) = value_and_grads(
        lambda a, b: F.aligned_box_iou(a, b, kind="ciou", box_format="cxcywh", convention="yolov5"), b1, b2
    )
    assert_close(out, UL["ciou_xywh"][:, 0], msg="ciou_xywh")
    assert_close(g1, UL["ciou_xywh_grad1"], msg="grad1")
    assert_close(g2, UL["ciou_xywh_grad2"], msg="grad2")


@pytest.mark.parametrize("reg_max", [16, 8])
def test_ultralytics_dfl(reg_max):
    pred, target = t64(UL[f"dfl{reg_max}_pred"]), t64(UL[f"dfl{reg_max}_target"])
    clamped = target.clamp(0, reg_max - 1 - 0.01)  # DFLoss clamps before the loss

    def fn(p):
        return F.distribution_focal_loss(p, clamped.reshape(-1), reduction="none").view(-1, 4).mean(-1)

    out, (gp,) = value_and_grads(fn, pred)
    assert_close(out, UL[f"dfl{reg_max}"][:, 0], msg="dfl")
    assert_close(gp, UL[f"dfl{reg_max}_grad"], msg="dfl_grad")


def test_ultralytics_varifocal():
    x, q, lab = t64(UL["vfl_logits"]), t64(UL["vfl_gt_score"]), t64(UL["vfl_label"])
    out, (gx,) = value_and_grads(lambda a: F.varifocal_loss(a, q, lab, reduction="none").mean(1).sum(), x)
    # ultralytics computes this block in float32 (manifest note): float32 accuracy only
    assert_close(out, UL["vfl"], rtol=1e-6, atol=1e-7, msg="vfl")
    assert_close(gx, UL["vfl_grad"], rtol=1e-5, atol=1e-7, msg="vfl_grad")


@pytest.mark.parametrize("prefix,gamma,alpha", [("focal", 1.5, 0.25), ("focal_g2_a0", 2.0, -1.0)])
def test_ultralytics_focal(prefix, gamma, alpha):
    # ultralytics' FocalLoss switches alpha off for alpha <= 0; here alpha < 0 does.
    logits_key = "focal_logits" if prefix == "focal" else f"{prefix}_logits"
    label_key = "focal_label" if prefix == "focal" else f"{prefix}_label"
    x, y = t64(UL[logits_key]), t64(UL[label_key])
    out, (gx,) = value_and_grads(
        lambda a: F.sigmoid_focal_loss(a, y, alpha=alpha, gamma=gamma, reduction="none").mean(1).sum(), x
    )
    assert_close(out, UL[prefix], msg=prefix)
    assert_close(gx, UL[prefix + "_grad"], msg=prefix + "_grad")
