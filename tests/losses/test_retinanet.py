"""RetinaNetLoss beyond the reference cases: gradients, empty images, precision, bad input.

The reference parity (torchvision's numbers) is in test_retinanet_reference.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import detloss
from detloss.anchor_generators import AnchorGenerator
from detloss.losses.registry import LOSSES
from detloss.losses.retinanet import BOX_LOSSES, RetinaNetLoss

ANCHORS = AnchorGenerator(((16,), (32,)), ((0.5, 1.0, 2.0),) * 2)([(4, 4), (2, 2)], (32, 32), dtype=torch.float64)
A = ANCHORS.shape[0]


def heads(batch=2, classes=3, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cls = (torch.randn(batch, A, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    reg = (torch.randn(batch, A, 4, generator=g, dtype=torch.float64) * 0.5 * scale).to(dtype)
    return cls.requires_grad_(), reg.requires_grad_()


def targets(n_per_image=(2, 1), dtype=torch.float64):
    rows = [[2.0, 3.0, 18.0, 14.0], [10.0, 8.0, 30.0, 31.0], [0.0, 0.0, 6.0, 4.0]]
    return [
        {"boxes": torch.tensor(rows[:n], dtype=dtype).reshape(-1, 4), "labels": torch.arange(n) % 3}
        for n in n_per_image
    ]


def test_public_name_and_registry():
    assert detloss.RetinaNetLoss is RetinaNetLoss
    assert LOSSES["retinanet"] is RetinaNetLoss
    loss = RetinaNetLoss(3)
    assert (loss.fg_iou_thresh, loss.bg_iou_thresh, loss.allow_low_quality_matches) == (0.5, 0.4, True)
    assert loss.box_loss == "l1" and loss.box_coder.weights == (1.0, 1.0, 1.0, 1.0)
    assert (loss.focal_alpha, loss.focal_gamma) == (0.25, 2.0)


@pytest.mark.parametrize("box_loss", BOX_LOSSES)
def test_gradcheck(box_loss):
    loss_fn = RetinaNetLoss(3, box_loss=box_loss)
    cls, reg = heads(batch=2, classes=3)
    tg = targets()
    if box_loss == "ciou":
        # CIoU's trade-off weight alpha carries no gradient (torchvision's definition, checked
        # against torchvision in the reference test): only the class logits are checked here.
        reg = reg.detach()
        assert torch.autograd.gradcheck(lambda c: loss_fn(c, reg, ANCHORS, tg).total, (cls,), fast_mode=True)
        return
    assert torch.autograd.gradcheck(lambda c, r: loss_fn(c, r, ANCHORS, tg).total, (cls, reg), fast_mode=True)


def test_terms_sum_to_total_and_backpropagate():
    cls, reg = heads()
    out = RetinaNetLoss(3, gains={"cls": 2.0, "box": 0.5})(cls, reg, [ANCHORS, ANCHORS], targets())
    torch.testing.assert_close(out.terms["cls"] + out.terms["box"], out.total)
    plain = RetinaNetLoss(3)(cls, reg, ANCHORS, targets())
    torch.testing.assert_close(out.components["cls"], 2.0 * plain.components["cls"])
    torch.testing.assert_close(out.components["box"], 0.5 * plain.components["box"])
    sum(out.terms.values()).backward()
    assert cls.grad is not None and reg.grad is not None
    assert set(out.stats) >= {"num_pos", "num_targets", "iou_mean", "normalizer", "matched_idxs"}
    assert isinstance(out.stats["num_pos"], int) and isinstance(out.stats["iou_mean"], float)
    assert out.stats["num_targets"] == 3


def test_empty_image_is_all_background_and_keeps_its_focal_term():
    cls, reg = heads()
    out = RetinaNetLoss(3)(cls, reg, ANCHORS, targets((2, 0)))
    assert (out.stats["matched_idxs"][1] == -1).all()
    out.total.backward()
    assert (cls.grad[1] != 0).all()  # every anchor of the empty image learns background
    assert (reg.grad[1] == 0).all()
    # The empty image's term alone: focal over every anchor / max(1, 0), divided by the batch.
    one = RetinaNetLoss(3)(cls[1:].detach(), reg[1:].detach(), ANCHORS, targets((0,)))
    want = detloss.functional.sigmoid_focal_loss(cls[1].detach(), torch.zeros(A, 3, dtype=torch.float64), reduction="sum")
    torch.testing.assert_close(one.components["cls"], want)


def test_all_empty_batch():
    cls, reg = heads()
    out = RetinaNetLoss(3)(cls, reg, ANCHORS, targets((0, 0)))
    assert out.components["box"].item() == 0.0 and out.stats["num_pos"] == 0
    out.total.backward()
    assert torch.isfinite(cls.grad).all() and (reg.grad == 0).all()
    assert out.stats["iou_mean"] == 0.0 and out.stats["normalizer"] == 1.0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    c64, r64 = heads()
    c, r = (t.detach().to(dtype).requires_grad_() for t in (c64, r64))
    out = RetinaNetLoss(3, box_loss="giou")(c, r, ANCHORS.to(dtype), targets(dtype=dtype))
    assert out.total.dtype == torch.float32
    out.total.backward()
    assert c.grad.dtype == dtype and r.grad.dtype == dtype
    ref = RetinaNetLoss(3, box_loss="giou")(c.detach().float(), r.detach().float(), ANCHORS.to(dtype).float(),
                                             targets(dtype=dtype))
    torch.testing.assert_close(out.total, ref.total)


@settings(max_examples=30, deadline=None)
@given(
    st.sampled_from(BOX_LOSSES),
    st.floats(1.0, 1e4),
    st.integers(0, 3),
    st.integers(0, 3),
)
def test_extreme_inputs_stay_finite(box_loss, scale, n0, n1):
    cls, reg = heads(scale=scale)
    tg = targets((min(n0, 3), min(n1, 3)))
    tg[0]["boxes"] = torch.cat((tg[0]["boxes"], torch.tensor([[5.0, 5.0, 5.0, 9.0]], dtype=torch.float64)))  # zero width
    tg[0]["labels"] = torch.cat((tg[0]["labels"], torch.tensor([1])))
    out = RetinaNetLoss(3, box_loss=box_loss)(cls, reg, ANCHORS, tg)
    assert torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(cls.grad).all() and torch.isfinite(reg.grad).all()


def test_decode():
    cls, reg = heads()
    dec = RetinaNetLoss(3).decode(cls, reg, ANCHORS)
    assert dec.boxes.shape == (2, A, 4) and dec.scores.shape == (2, A, 3)
    torch.testing.assert_close(dec.scores, torch.sigmoid(cls))
    zero = RetinaNetLoss(3).decode(cls, torch.zeros_like(reg), ANCHORS).boxes
    torch.testing.assert_close(zero, ANCHORS.expand(2, -1, -1))


def test_per_image_normalization():
    # Duplicating image 0 into a batch of two changes nothing: each image is normalized alone.
    cls, reg = heads(batch=1)
    tg = targets((2,))
    one = RetinaNetLoss(3)(cls, reg, ANCHORS, tg)
    two = RetinaNetLoss(3)(cls.repeat(2, 1, 1), reg.repeat(2, 1, 1), ANCHORS, tg * 2)
    torch.testing.assert_close(one.total, two.total)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda c, r, a, t: (c, r, a[:-1], t), ValueError, r"anchors: expected 60 anchors per image \(the A of the head outputs\), got 59"),
        (lambda c, r, a, t: (c, r, [a, a[:-1]], t), ValueError, r"anchors\[1\]: expected 60 anchors like anchors\[0\]"),
        (lambda c, r, a, t: (c[..., :2], r, a, t), ValueError, r"cls_logits: expected shape \[B, A, 3\]"),
        (lambda c, r, a, t: (c, r[:, :-1], a, t), ValueError, r"bbox_regression: expected shape \(2, 60, 4\) like cls_logits, got \(2, 59, 4\)"),
        (lambda c, r, a, t: (c.long(), r, a, t), TypeError, r"cls_logits: expected a floating-point tensor"),
        (lambda c, r, a, t: (c, r, a, t[:1]), ValueError, r"targets: expected 2 entries"),
        (lambda c, r, a, t: (c, r, a, t[0]), TypeError, r"targets: expected a list"),
        (
            lambda c, r, a, t: (c, r, a, [{"boxes": torch.tensor([[5.0, 1.0, 2.0, 4.0]]), "labels": torch.tensor([0])}, t[1]]),
            ValueError, r"targets\[0\]\['boxes'\]: expected xyxy boxes with x1 <= x2",
        ),
        (
            lambda c, r, a, t: (c, r, a, [t[0], {"boxes": t[1]["boxes"], "labels": torch.tensor([3])}]),
            ValueError, r"targets\[1\]\['labels'\]: expected class indices in \[0, 3\), row 0 is 3",
        ),
        (
            lambda c, r, a, t: (c, r, a, [t[0], {"boxes": t[1]["boxes"], "labels": torch.tensor([-1])}]),
            ValueError, r"targets\[1\]\['labels'\]: expected class indices in \[0, 3\)",
        ),
    ],
)
def test_bad_inputs(mutate, error, match):
    cls, reg = heads()
    args = mutate(cls, reg, ANCHORS, targets())
    with pytest.raises(error, match=match):
        RetinaNetLoss(3)(*args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_classes": 0}, "num_classes: expected a positive int"),
        ({"num_classes": 3, "box_loss": "iou"}, "box_loss: expected one of"),
        ({"num_classes": 3, "fg_iou_thresh": 0.3}, "bg_iou_thresh: expected a value <= fg_iou_thresh"),
        ({"num_classes": 3, "bbox_reg_weights": (1.0, 1.0, 0.0, 1.0)}, "weights: expected 4 finite positive"),
        ({"num_classes": 3, "focal_gamma": -1.0}, "focal_gamma: expected a number >= 0"),
        ({"num_classes": 3, "focal_alpha": 1.5}, r"focal_alpha: expected a number in \[0, 1\] or -1, got 1.5"),
        ({"num_classes": 3, "gains": {"cls": 1.0}}, "gains: expected one gain per term"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RetinaNetLoss(**kwargs)


def test_assign_matches_forward():
    cls, reg = heads()
    loss_fn = RetinaNetLoss(3)
    asg = loss_fn.assign(cls, reg, ANCHORS, targets())
    out = loss_fn(cls, reg, ANCHORS, targets())
    for a, b in zip(asg.matched_idxs(), out.stats["matched_idxs"]):
        assert torch.equal(a, b)
    assert out.stats["num_pos"] == asg.num_pos > 0 and math.isfinite(out.stats["iou_mean"])
