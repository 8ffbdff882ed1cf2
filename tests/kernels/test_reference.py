"""Fused kernels against numbers produced by the original implementations (float64).

Reference data, copied from ../shared/reference into tests/data/:
- tests/data/torchvision_fcos/ops.npz, SOURCE: torchvision 0.29.1+cu130 with torch 2.14.1+cu130:
  torchvision.ops sigmoid_focal_loss, generalized_box_iou_loss, distance_box_iou_loss,
  complete_box_iou_loss, box_iou, generalized_box_iou; ... Run unmodified on CPU in float64.
- tests/data/yolov5_v7/blocks.npz, SOURCE: ultralytics/yolov5 tag v7.0 (commit
  915bbf294bb74c859f0b41f1c23bc395014ea679): utils/loss.py ComputeLoss, BCEBlurWithLogitsLoss,
  FocalLoss, QFocalLoss, smooth_BCE; utils/metrics.py bbox_iou. Run unmodified on CPU in float64.
- tests/data/ultralytics/blocks.npz, SOURCE: ultralytics 8.4.190 (torch 2.14.1+cu130), imported
  unmodified: ultralytics/utils/loss.py ... VarifocalLoss, FocalLoss; ultralytics/utils/metrics.py
  bbox_iou. CPU, float64.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _kernel_helpers import loss_and_grad
from detloss import kernels

DATA = Path(__file__).resolve().parents[1] / "data"
RTOL = 1e-6


def _load(rel):
    z = np.load(DATA / rel)
    return {k: torch.from_numpy(z[k]) for k in z.files}


TV = _load("torchvision_fcos/ops.npz")
Y5 = _load("yolov5_v7/blocks.npz")
UL = _load("ultralytics/blocks.npz")


def _close(actual, expected, rtol=RTOL, atol=1e-12):
    torch.testing.assert_close(actual, expected.to(actual.dtype), rtol=rtol, atol=atol)


@pytest.mark.parametrize("targets", ["binary", "soft"])
@pytest.mark.parametrize("alpha", [0.25, -1.0])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.0])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_torchvision(eager, targets, alpha, gamma, reduction):
    key = f"focal_{targets}_a{alpha}_g{gamma}_{reduction}"
    t = TV[f"focal_targets_{targets}"]
    loss, grad = loss_and_grad(
        lambda x: kernels.fused_sigmoid_focal_loss(x, t, alpha, gamma, reduction), TV["focal_logits"]
    )
    _close(loss, TV[key])
    _close(grad, TV[key + "_grad"])


@pytest.mark.parametrize("kind", ["giou", "diou", "ciou"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_box_losses_torchvision(eager, kind, reduction):
    key = f"{kind}_loss_{reduction}"
    loss, grad = loss_and_grad(
        lambda p: kernels.fused_iou_loss(p, TV["boxes2"], kind, "xyxy", "torchvision", reduction), TV["boxes1"]
    )
    _close(loss, TV[key])
    _close(grad, TV[key + "_grad1"])


@pytest.mark.parametrize("kind", ["iou", "giou", "diou", "ciou"])
@pytest.mark.parametrize("fmt", ["xywh", "xyxy"])
def test_bbox_iou_yolov5(eager, kind, fmt):
    box_format = "cxcywh" if fmt == "xywh" else "xyxy"
    key = f"bbox_iou_{kind}_{fmt}"
    target = Y5[f"box2_{fmt}"]
    loss, grad = loss_and_grad(
        lambda p: kernels.fused_iou_loss(p, target, kind, box_format, "yolov5", "none"), Y5[f"box1_{fmt}"]
    )
    _close(1 - loss, Y5[key])
    _close(-grad, Y5[key + "_grad1"])  # the data holds d(sum IoU)/d box1; the loss is 1 - IoU


@pytest.mark.parametrize("key,fmt", [("iou_xyxy", "xyxy"), ("giou_xyxy", "xyxy"), ("diou_xyxy", "xyxy"),
                                     ("ciou_xyxy", "xyxy"), ("ciou_xywh", "xywh")])
def test_bbox_iou_ultralytics(eager, key, fmt):
    kind = key.split("_")[0]
    box_format = "cxcywh" if fmt == "xywh" else "xyxy"
    target = UL[f"iou_boxes2_{fmt}"]
    loss, grad = loss_and_grad(
        lambda p: kernels.fused_iou_loss(p, target, kind, box_format, "yolov5", "none"), UL[f"iou_boxes1_{fmt}"]
    )
    _close(1 - loss, UL[key][:, 0])
    _close(-grad, UL[key + "_grad1"])


@pytest.mark.parametrize("targets", ["binary", "soft"])
def test_bce_blur_yolov5(eager, targets):
    t = Y5[f"targets_{targets}"]
    loss, grad = loss_and_grad(lambda x: kernels.fused_bce_blur(x, t, 0.05, "mean"), Y5["logits"])
    _close(loss, Y5[f"bce_blur_{targets}"])
    _close(grad, Y5[f"bce_blur_{targets}_grad"])


@pytest.mark.parametrize("targets", ["binary", "soft"])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_focal_and_qfocal_yolov5(eager, targets, reduction):
    t = Y5[f"targets_{targets}"]
    x = Y5["logits"]
    loss, grad = loss_and_grad(lambda a: kernels.fused_sigmoid_focal_loss(a, t, 0.25, 1.5, reduction), x)
    _close(loss, Y5[f"focal_{targets}_{reduction}"])
    _close(grad, Y5[f"focal_{targets}_{reduction}_grad"])
    loss, grad = loss_and_grad(lambda a: kernels.fused_quality_focal_loss(a, t, 1.5, 0.25, reduction), x)
    _close(loss, Y5[f"qfocal_{targets}_{reduction}"])
    _close(grad, Y5[f"qfocal_{targets}_{reduction}_grad"])


def test_varifocal_ultralytics(eager):
    score, label = UL["vfl_gt_score"], UL["vfl_label"]
    loss, grad = loss_and_grad(
        lambda x: kernels.fused_varifocal_loss(x, score, label, 0.75, 2.0, "none").mean(1).sum(), UL["vfl_logits"]
    )
    # ultralytics computes this one in float32 (manifest note): float32-accurate only
    _close(loss, UL["vfl"], rtol=1e-5, atol=1e-6)
    _close(grad, UL["vfl_grad"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case,alpha,gamma", [("focal", 0.25, 1.5), ("focal_g2_a0", -1.0, 2.0)])
def test_focal_ultralytics(eager, case, alpha, gamma):
    x = UL["focal_logits" if case == "focal" else "focal_g2_a0_logits"]
    t = UL["focal_label" if case == "focal" else "focal_g2_a0_label"]
    loss, grad = loss_and_grad(
        lambda a: kernels.fused_sigmoid_focal_loss(a, t, alpha, gamma, "none").mean(1).sum(), x
    )
    _close(loss, UL[case])
    _close(grad, UL[case + "_grad"])
