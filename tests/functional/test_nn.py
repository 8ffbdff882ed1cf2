"""The nn.Module twins give exactly the functional results and carry their tensors as buffers."""
from __future__ import annotations

import torch

import detloss.functional as F
import detloss.nn as N


def test_modules_match_functional():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g)
    y = torch.rand(4, 5, generator=g)
    p = torch.rand(4, 5, generator=g)
    w, pw = torch.rand(5, generator=g), torch.rand(5, generator=g)
    t = torch.tensor([0, 4, 2, -100])
    b1 = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 4]])
    b2 = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 5]])
    lab = (y > 0.5).float()
    pairs = [
        (N.BCELoss(weight=w)(p, y), F.binary_cross_entropy(p, y, weight=w)),
        (N.BCEWithLogitsLoss(w, pw, "sum")(x, y), F.bce_with_logits(x, y, w, pw, "sum")),
        (N.BCEBlurWithLogitsLoss(0.1)(x, y), F.bce_blur(x, y, 0.1)),
        (N.CrossEntropyLoss(w, label_smoothing=0.1)(x, t), F.cross_entropy(x, t, w, label_smoothing=0.1)),
        (N.SigmoidFocalLoss(0.5, 1.5, "mean")(x, y), F.sigmoid_focal_loss(x, y, 0.5, 1.5, "mean")),
        (N.SoftmaxFocalLoss(w)(x, t), F.softmax_focal_loss(x, t, w)),
        (N.QualityFocalLoss(1.5, 0.25)(x, y), F.quality_focal_loss(x, y, 1.5, 0.25)),
        (N.VarifocalLoss()(x, y, lab), F.varifocal_loss(x, y, lab)),
        (N.SmoothL1Loss(0.5)(x, y), F.smooth_l1_loss(x, y, 0.5)),
        (N.L1Loss("sum")(x, y), F.l1_loss(x, y, "sum")),
        (N.MSELoss()(x, y), F.mse_loss(x, y)),
        (N.IoULoss("ciou", convention="yolov5")(b1, b2), F.iou_loss(b1, b2, "ciou", convention="yolov5")),
        (N.DistributionFocalLoss("none")(x, y[:, 0] * 4), F.distribution_focal_loss(x, y[:, 0] * 4, "none")),
    ]
    for got, expected in pairs:
        assert torch.equal(got, expected)


def test_buffers_follow_dtype_and_state_dict():
    m = N.BCEWithLogitsLoss(pos_weight=torch.ones(3)).double()
    assert m.pos_weight.dtype == torch.float64
    assert "pos_weight" in m.state_dict()
    assert "reduction='mean'" in repr(m)
