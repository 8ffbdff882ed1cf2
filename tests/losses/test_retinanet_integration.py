"""detloss.integrations.torchvision without torchvision: stand-ins carrying the attributes the
adapter reads from torchvision's RetinaNet and SSD models (their class names decide the kind).

The real models are exercised in integration_tests/test_torchvision_models.py.
"""
from __future__ import annotations

import types

import pytest
import torch
from torch import nn

import detloss
from detloss.anchor_generators import AnchorGenerator, DefaultBoxGenerator
from detloss.integrations.torchvision import model_kind, use_detloss, use_torchvision_loss


class Matcher:
    def __init__(self, high, low, low_quality):
        self.high_threshold, self.low_threshold, self.allow_low_quality_matches = high, low, low_quality


class Coder:
    def __init__(self, weights, clip=4.135166556742356):
        self.weights, self.bbox_xform_clip = weights, clip


class RetinaNet(nn.Module):
    def __init__(self, num_classes=3, loss_type="giou"):
        super().__init__()
        self.proposal_matcher = Matcher(0.6, 0.3, False)
        self.head = types.SimpleNamespace(
            classification_head=types.SimpleNamespace(num_classes=num_classes),
            regression_head=types.SimpleNamespace(_loss_type=loss_type, box_coder=Coder((2.0, 2.0, 1.0, 1.0))),
        )

    def compute_loss(self, targets, head_outputs, anchors):  # torchvision's signature
        raise AssertionError("the stock loss must not run")


class SSD(nn.Module):
    def __init__(self, num_classes=4):
        super().__init__()
        self.proposal_matcher = Matcher(0.45, 0.45, False)
        self.neg_to_pos_ratio = 2.0
        self.box_coder = Coder((10.0, 10.0, 5.0, 5.0))
        self.head = types.SimpleNamespace(classification_head=types.SimpleNamespace(num_columns=num_classes))

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs):
        raise AssertionError("the stock loss must not run")


class MyRetinaNet(RetinaNet):
    pass


def inputs(anchors, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = anchors.shape[0]
    heads = {
        "cls_logits": torch.randn(2, a, classes, generator=g, dtype=torch.float64, requires_grad=True),
        "bbox_regression": torch.randn(2, a, 4, generator=g, dtype=torch.float64, requires_grad=True),
    }
    targets = [
        {"boxes": torch.tensor([[2.0, 3.0, 20.0, 14.0]], dtype=torch.float64), "labels": torch.tensor([1])},
        {"boxes": torch.zeros((0, 4), dtype=torch.float64), "labels": torch.zeros(0, dtype=torch.int64)},
    ]
    return heads, targets, [anchors, anchors.clone()]


def test_retinanet_settings_are_read_from_the_model():
    model = use_detloss(MyRetinaNet())
    assert model_kind(model) == "RetinaNet"
    loss = model.compute_loss.loss
    assert isinstance(loss, detloss.RetinaNetLoss)
    assert (loss.fg_iou_thresh, loss.bg_iou_thresh, loss.allow_low_quality_matches) == (0.6, 0.3, False)
    assert loss.box_loss == "giou" and loss.box_coder.weights == (2.0, 2.0, 1.0, 1.0)
    anchors = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)([(4, 4), (2, 2)], (32, 32), dtype=torch.float64)
    heads, targets, anchor_list = inputs(anchors, 3)
    got = model.compute_loss(targets, heads, anchor_list)
    assert list(got) == ["classification", "bbox_regression"]
    want = loss(heads["cls_logits"], heads["bbox_regression"], anchor_list, targets)
    torch.testing.assert_close(got["classification"], want.components["cls"])
    torch.testing.assert_close(got["bbox_regression"], want.components["box"])
    sum(got.values()).backward()  # the values carry their graph
    assert heads["cls_logits"].grad is not None


def test_ssd_settings_and_keys():
    model = use_detloss(SSD(), gains={"cls": 1.0, "box": 0.5})
    loss = model.compute_loss.loss
    assert isinstance(loss, detloss.SSDLoss) and loss.num_classes == 4
    assert (loss.iou_thresh, loss.neg_to_pos_ratio) == (0.45, 2.0) and loss.gains["box"] == 0.5
    anchors = DefaultBoxGenerator([[2], [2]], scales=[0.25, 0.5, 1.0], steps=[8, 16])([(4, 4), (2, 2)], (32, 32), dtype=torch.float64)
    heads, targets, anchor_list = inputs(anchors, 4)
    got = model.compute_loss(targets, heads, anchor_list, None)
    assert list(got) == ["bbox_regression", "classification"]
    want = loss(heads["cls_logits"], heads["bbox_regression"], anchor_list, targets)
    torch.testing.assert_close(got["bbox_regression"], want.components["box"])


def test_undo_restores_the_class_method():
    model = use_detloss(RetinaNet())
    use_detloss(model)
    use_torchvision_loss(model)
    assert "compute_loss" not in model.__dict__
    with pytest.raises(AssertionError, match="stock loss"):
        model.compute_loss([], {}, [])


def test_unsupported_models():
    with pytest.raises(TypeError, match="model: expected a torchvision FCOS, RetinaNet or SSD model"):
        use_detloss(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model: expected a torchvision detection model"):
        use_detloss("RetinaNet")
    broken = RetinaNet()
    del broken.proposal_matcher
    with pytest.raises(TypeError, match="model: expected torchvision's proposal_matcher"):
        use_detloss(broken)


class ImageList:
    def __init__(self, tensors):
        self.tensors = tensors


class StubAnchorGenerator(nn.Module):
    sizes = ((8,), (16,))

    def forward(self, image_list, feature_maps):
        return []


class FCOS(nn.Module):
    def __init__(self):
        super().__init__()
        self.center_sampling_radius = 1.5
        self.anchor_generator = StubAnchorGenerator()
        self.head = types.SimpleNamespace(classification_head=types.SimpleNamespace(num_classes=3))


def test_fcos_reads_the_sizes_from_the_anchor_generator():
    model = use_detloss(FCOS())
    with pytest.raises(RuntimeError, match="anchor generator's sizes were not recorded"):
        model.compute_loss([], {}, [], [])
    # torchvision's forward calls the generator with the padded batch and the feature maps
    model.anchor_generator(ImageList(torch.zeros(2, 3, 32, 48)), [torch.zeros(2, 8, 4, 6), torch.zeros(2, 8, 2, 3)])
    g = torch.Generator().manual_seed(0)
    p = 4 * 6 + 2 * 3
    heads = {
        "cls_logits": torch.randn(2, p, 3, generator=g, dtype=torch.float64, requires_grad=True),
        "bbox_regression": torch.rand(2, p, 4, generator=g, dtype=torch.float64, requires_grad=True),
        "bbox_ctrness": torch.randn(2, p, 1, generator=g, dtype=torch.float64, requires_grad=True),
    }
    targets = [
        {"boxes": torch.tensor([[2.0, 3.0, 20.0, 14.0]], dtype=torch.float64), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[10.0, 8.0, 40.0, 30.0]], dtype=torch.float64), "labels": torch.tensor([2])},
    ]
    got = model.compute_loss(targets, heads, None, [p - 6, 6])
    assert list(got) == ["classification", "bbox_regression", "bbox_ctrness"]
    want = detloss.FCOSLoss(3, strides=(8, 16), anchor_sizes=(8.0, 16.0))(
        heads["cls_logits"], heads["bbox_regression"], heads["bbox_ctrness"], [(4, 6), (2, 3)], targets, image_size=(32, 48)
    )
    for k, ours in (("classification", "cls"), ("bbox_regression", "box"), ("bbox_ctrness", "centerness")):
        torch.testing.assert_close(got[k], want.components[ours])
    use_torchvision_loss(model)
    assert not model.anchor_generator._forward_pre_hooks
