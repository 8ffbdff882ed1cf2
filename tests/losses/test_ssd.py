"""SSDLoss beyond the reference cases: gradients, mining, empty images, precision, bad input.

The reference parity (torchvision's numbers) is in test_ssd_reference.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import detloss
from detloss.anchor_generators import DefaultBoxGenerator
from detloss.losses.registry import LOSSES
from detloss.losses.ssd import SSDLoss, mine_hard_negatives, per_anchor_cross_entropy

ANCHORS = DefaultBoxGenerator([[2], [2]], scales=[0.25, 0.5, 1.0], steps=[8, 16])([(4, 4), (2, 2)], (32, 32), dtype=torch.float64)
A = ANCHORS.shape[0]


def heads(batch=2, classes=4, dtype=torch.float64, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    cls = (torch.randn(batch, A, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    reg = (torch.randn(batch, A, 4, generator=g, dtype=torch.float64) * scale).to(dtype)
    return cls.requires_grad_(), reg.requires_grad_()


def targets(n_per_image=(2, 1), dtype=torch.float64):
    rows = [[2.0, 3.0, 12.0, 14.0], [10.0, 8.0, 30.0, 31.0], [0.0, 0.0, 6.0, 4.0]]
    return [
        {"boxes": torch.tensor(rows[:n], dtype=dtype).reshape(-1, 4), "labels": 1 + torch.arange(n) % 3}
        for n in n_per_image
    ]


def test_public_name_registry_and_defaults():
    assert detloss.SSDLoss is SSDLoss and LOSSES["ssd"] is SSDLoss
    loss = SSDLoss(4)
    assert loss.iou_thresh == 0.5 and loss.neg_to_pos_ratio == 3.0
    assert loss.box_coder.weights == (10.0, 10.0, 5.0, 5.0)


def test_gradcheck():
    loss_fn = SSDLoss(4)
    cls, reg = heads()
    tg = targets()
    assert torch.autograd.gradcheck(lambda c, r: loss_fn(c, r, ANCHORS, tg).total, (cls, reg), fast_mode=True)


def test_terms_and_stats():
    cls, reg = heads()
    out = SSDLoss(4)(cls, reg, [ANCHORS, ANCHORS], targets())
    torch.testing.assert_close(out.terms["cls"] + out.terms["box"], out.total)
    n = out.stats["num_pos"]
    assert n > 0 and out.stats["normalizer"] == float(n)
    assert out.stats["num_mined"] == int(out.stats["mined"].sum()) == min(3 * n, 2 * A)
    assert isinstance(out.stats["iou_mean"], float)


def test_mining_takes_the_highest_losses():
    g = torch.Generator().manual_seed(3)
    loss = torch.rand(2, 50, generator=g, dtype=torch.float64)
    positive = torch.zeros(2, 50, dtype=torch.bool)
    positive[0, [3, 7]] = True
    mined = mine_hard_negatives(loss, positive, 3.0)
    assert mined[0].sum() == 6 and not mined[1].any()  # an image without positives mines nothing
    negatives = loss[0].masked_fill(positive[0], -1)
    assert set(mined[0].nonzero().squeeze(1).tolist()) == set(negatives.topk(6).indices.tolist())
    # The count is not rounded: 2 positives x 2.25 = 4.5 mines ranks 0..4.
    assert mine_hard_negatives(loss, positive, 2.25)[0].sum() == 5
    # When the count reaches the anchors, every anchor is mined, positives included.
    assert mine_hard_negatives(loss, positive, 30.0)[0].all()


def test_empty_image_and_all_empty_batch():
    cls, reg = heads()
    out = SSDLoss(4)(cls, reg, ANCHORS, targets((2, 0)))
    out.total.backward()
    assert (cls.grad[1] == 0).all() and (reg.grad[1] == 0).all()  # nothing mined, no positive
    cls, reg = heads()
    out = SSDLoss(4)(cls, reg, ANCHORS, targets((0, 0)))
    assert out.total.item() == 0.0 and out.stats["num_mined"] == 0
    out.total.backward()
    assert (cls.grad == 0).all() and (reg.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    c64, r64 = heads()
    c, r = (t.detach().to(dtype).requires_grad_() for t in (c64, r64))
    out = SSDLoss(4)(c, r, ANCHORS.to(dtype), targets(dtype=dtype))
    assert out.total.dtype == torch.float32
    out.total.backward()
    assert c.grad.dtype == dtype and r.grad.dtype == dtype
    ref = SSDLoss(4)(c.detach().float(), r.detach().float(), ANCHORS.to(dtype).float(), targets(dtype=dtype))
    torch.testing.assert_close(out.total, ref.total)


@settings(max_examples=30, deadline=None)
@given(st.floats(1.0, 1e4), st.integers(0, 3), st.integers(0, 3))
def test_extreme_inputs_stay_finite(scale, n0, n1):
    cls, reg = heads(scale=scale)
    tg = targets((n0, n1))
    tg[0]["boxes"] = torch.cat((tg[0]["boxes"], torch.tensor([[5.0, 5.0, 5.0, 9.0]], dtype=torch.float64)))
    tg[0]["labels"] = torch.cat((tg[0]["labels"], torch.tensor([2])))
    out = SSDLoss(4)(cls, reg, ANCHORS, tg)
    assert torch.isfinite(out.total)
    out.total.backward()
    assert torch.isfinite(cls.grad).all() and torch.isfinite(reg.grad).all()


def test_decode():
    cls, reg = heads()
    dec = SSDLoss(4).decode(cls, reg, ANCHORS)
    torch.testing.assert_close(dec.scores, torch.softmax(cls, -1))
    torch.testing.assert_close(SSDLoss(4).decode(cls, torch.zeros_like(reg), ANCHORS).boxes, ANCHORS.expand(2, -1, -1))


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda c, r, a, t: (c, r, a[:-1], t), ValueError, rf"anchors: expected {A} anchors per image"),
        (lambda c, r, a, t: (c, r, [a[:-1], a[:-1]], t), ValueError, rf"anchors\[0\]: expected {A} anchors per image"),
        (lambda c, r, a, t: (c, r, a, [t[0], {"boxes": torch.tensor([[5.0, 1.0, 5.0, 0.5]]), "labels": torch.tensor([1])}]),
         ValueError, r"targets\[1\]\['boxes'\]: expected xyxy boxes with x1 <= x2 and y1 <= y2"),
        (lambda c, r, a, t: (c, r, a, [t[0], {"boxes": t[1]["boxes"], "labels": torch.tensor([4])}]),
         ValueError, r"targets\[1\]\['labels'\]: expected class indices in \[0, 4\)"),
        (lambda c, r, a, t: (c, r, a, [t[0], {"boxes": t[1]["boxes"], "labels": torch.tensor([1.0])}]),
         TypeError, r"targets\[1\]\['labels'\]: expected an integer tensor"),
    ],
)
def test_bad_inputs(mutate, error, match):
    cls, reg = heads()
    with pytest.raises(error, match=match):
        SSDLoss(4)(*mutate(cls, reg, ANCHORS, targets()))


def test_bad_arguments():
    with pytest.raises(ValueError, match="neg_to_pos_ratio: expected a finite number >= 0"):
        SSDLoss(4, neg_to_pos_ratio=-1)
    with pytest.raises(ValueError, match="num_classes: expected a positive int"):
        SSDLoss(1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_blockwise_cross_entropy_equals_torch(dtype):
    # The mining ranks anchors by these numbers: they must be torch's cross-entropy bit for bit,
    # whatever the block size (blocks that divide the rows and blocks that do not).
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(1000, 7, generator=g, dtype=torch.float64) * 30).to(dtype)
    t = torch.randint(0, 7, (1000,), generator=g)
    want = torch.nn.functional.cross_entropy(x, t, reduction="none")
    for rows in (1, 7, 250, 4096):
        assert torch.equal(per_anchor_cross_entropy(x, t, rows=rows), want)
