"""Masks: crop_mask and the cropped, area-normalized mask BCE against per-instance loops, Dice and
BCE + Dice against their formulas, gradcheck, properties and bad input.

The oracle comparison with ultralytics' ``crop_mask`` / ``single_mask_loss`` / ``BCEDiceLoss`` lives
in integration_tests/test_ultralytics_task_pieces.py; the segmentation losses are checked against
the ultralytics 8.4.190 reference cases in tests/losses/test_segment*.py.
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.autograd import gradcheck

import detloss.functional as F
import detloss.nn as dnn

D = torch.float64


def case(n=5, h=9, w=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, h, w, generator=g, dtype=D) * 3
    target = (torch.rand(n, h, w, generator=g) > 0.5).to(D)
    c = torch.rand(n, 4, generator=g, dtype=D) * torch.tensor([w, h, w, h], dtype=D)
    boxes = torch.cat((torch.minimum(c[:, :2], c[:, 2:]), torch.maximum(c[:, :2], c[:, 2:])), 1)
    area = torch.rand(n, generator=g, dtype=D) * 0.5 + 0.01
    return logits, target, boxes, area


def test_crop_mask_keeps_pixel_indices_in_the_half_open_box():
    masks = torch.ones(2, 4, 5, dtype=D)
    boxes = torch.tensor([[1.0, 0.5, 3.0, 2.0], [0.0, 0.0, 4.5, 4.0]], dtype=D)
    out = F.crop_mask(masks, boxes)
    expected = torch.zeros(2, 4, 5, dtype=D)
    expected[0, 1:2, 1:3] = 1  # rows i with 0.5 <= i < 2 -> 1; cols j with 1 <= j < 3 -> 1, 2
    expected[1, 0:4, 0:5] = 1
    torch.testing.assert_close(out, expected)
    assert float(masks.sum()) == 40  # not in place


def test_cropped_mask_bce_equals_a_loop_over_instances():
    logits, target, boxes, area = case()
    per = []
    for i in range(5):
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits[i], target[i], reduction="none")
        rows = torch.arange(9, dtype=D)[:, None]
        cols = torch.arange(11, dtype=D)[None, :]
        inside = (cols >= boxes[i, 0]) & (cols < boxes[i, 2]) & (rows >= boxes[i, 1]) & (rows < boxes[i, 3])
        per.append((bce * inside).sum() / (9 * 11) / area[i])
    per = torch.stack(per)
    torch.testing.assert_close(F.cropped_mask_bce(logits, target, boxes=boxes, area=area, reduction="none"), per)
    torch.testing.assert_close(F.cropped_mask_bce(logits, target, boxes=boxes, area=area), per.sum())
    torch.testing.assert_close(dnn.CroppedMaskBCELoss(reduction="mean")(logits, target, boxes, area), per.mean())
    zero = area.clone()
    zero[2] = 0.0
    out = F.cropped_mask_bce(logits, target, boxes=boxes, area=zero, reduction="none")
    assert float(out[2]) == 0.0 and torch.isfinite(out).all()


def test_dice_and_bce_dice():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 6, 7, generator=g, dtype=D) * 2
    y = (torch.rand(2, 3, 6, 7, generator=g) > 0.6).to(D)
    p = x.sigmoid()
    dice = 1 - (2 * (p * y).sum((2, 3)) + 1) / (p.sum((2, 3)) + y.sum((2, 3)) + 1)
    torch.testing.assert_close(F.dice_loss(x, y, reduction="none"), dice.mean(1))
    torch.testing.assert_close(F.dice_loss(x, y), dice.mean())
    bce = torch.nn.functional.binary_cross_entropy_with_logits(x, y)
    torch.testing.assert_close(F.bce_dice_loss(x, y), 0.5 * bce + 0.5 * dice.mean())
    torch.testing.assert_close(dnn.BCEDiceLoss(bce_weight=1.0, dice_weight=0.0)(x, y), bce)
    assert float(F.dice_loss(torch.full_like(y, 1e4), torch.ones_like(y))) < 1e-12


def test_gradcheck():
    logits, target, boxes, area = case(3, 5, 6, seed=2)
    soft = target * 0.8 + 0.1
    args = (logits.requires_grad_(True), soft.requires_grad_(True), area.requires_grad_(True))
    assert gradcheck(lambda x, y, a: F.cropped_mask_bce(x, y, boxes=boxes, area=a), args)
    assert gradcheck(lambda m: F.crop_mask(m, boxes), (logits,))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 3, 4, generator=g, dtype=D).requires_grad_(True)
    y = torch.rand(2, 2, 3, 4, generator=g, dtype=D).requires_grad_(True)
    assert gradcheck(lambda x, y: F.dice_loss(x, y, reduction="sum"), (x, y))
    assert gradcheck(F.bce_dice_loss, (x, y))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    n=st.integers(0, 4),
    logit=st.sampled_from([0.0, 60.0, -60.0, 1e4, -1e4]),
    seed=st.integers(0, 2 ** 16),
)
def test_properties(dtype, n, logit, seed):
    logits, target, boxes, area = case(n, 4, 5, seed=seed)
    logits[:, 0] = logit
    area[:1] = 0.0
    x = logits.to(dtype).requires_grad_(True)
    out = F.cropped_mask_bce(x, target.to(dtype), boxes=boxes, area=area.to(dtype))
    sem = F.bce_dice_loss(x[None] if n else torch.zeros(1, 1, 4, 5, dtype=dtype, requires_grad=True), (target[None] if n else torch.zeros(1, 1, 4, 5)).to(dtype))
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == want and sem.dtype == want
    assert torch.isfinite(out) and torch.isfinite(sem)
    (g,) = torch.autograd.grad(out + (sem if n else 0), (x,))
    assert g.dtype == dtype and not torch.isnan(g).any()


def test_bad_input():
    logits, target, boxes, area = case()
    with pytest.raises(ValueError, match=r"target: expected the same shape as mask_logits \(5, 9, 11\), got \(5, 9, 10\)"):
        F.cropped_mask_bce(logits, target[..., :10], boxes=boxes, area=area)
    with pytest.raises(ValueError, match=r"mask_logits: expected masks of shape \[N, H, W\], got \(5, 99\)"):
        F.cropped_mask_bce(logits.view(5, -1), target.view(5, -1), boxes=boxes, area=area)
    with pytest.raises(ValueError, match=r"boxes: expected shape \(5, 4\) \(xyxy in mask pixels, one per mask\), got \(4, 4\)"):
        F.cropped_mask_bce(logits, target, boxes=boxes[:4], area=area)
    with pytest.raises(ValueError, match=r"area: expected shape \(5,\)"):
        F.cropped_mask_bce(logits, target, boxes=boxes, area=area[:, None])
    with pytest.raises(TypeError, match="target: expected a floating-point tensor"):
        F.cropped_mask_bce(logits, target.to(torch.uint8), boxes=boxes, area=area)
    with pytest.raises(ValueError, match=r"input: expected logits of shape \[B, C, H, W\]"):
        F.dice_loss(logits, target)
    with pytest.raises(ValueError, match=r"target: expected the same shape as input \(1, 5, 9, 11\), got \(1, 5, 4, 5\)"):
        F.bce_dice_loss(logits[None], target[None, :, :4, :5])


def proto_case(seed=0, n=11, b=3, nm=5, h=7, w=9):
    g = torch.Generator().manual_seed(seed)
    coef = torch.randn(n, nm, generator=g, dtype=D)
    proto = torch.randn(b, nm, h, w, generator=g, dtype=D)
    image = torch.randint(0, b, (n,), generator=g)
    maps = torch.randint(0, 4, (b, h, w), generator=g).to(torch.uint8)
    value = torch.randint(1, 4, (n,), generator=g)
    c = torch.rand(n, 4, generator=g, dtype=D) * torch.tensor([w, h, w, h], dtype=D)
    boxes = torch.cat((torch.minimum(c[:, :2], c[:, 2:]), torch.maximum(c[:, :2], c[:, 2:])), 1)
    area = torch.rand(n, generator=g, dtype=D) + 0.1
    return coef, proto, image, maps, value, boxes, area


@pytest.mark.parametrize("overlap", [True, False])
def test_prototype_mask_bce_equals_decode_then_cropped_bce(overlap, monkeypatch):
    import detloss.functional.masks as M

    monkeypatch.setattr(M, "PROTO_CHUNK_PIXELS", 2 * 63)  # several chunks per image
    coef, proto, image, maps, value, boxes, area = proto_case()
    leaves = [t.clone().requires_grad_(True) for t in (coef, proto, area)]
    if overlap:
        got = F.prototype_mask_bce(*leaves[:2], maps, boxes=boxes, area=leaves[2], image=image, mask_value=value, reduction="none")
        target = (maps[image] == value[:, None, None]).to(D)
    else:
        per = (maps[image] == value[:, None, None]).to(torch.uint8)
        got = F.prototype_mask_bce(*leaves[:2], per, boxes=boxes, area=leaves[2], image=image,
                                   mask_index=torch.arange(11), reduction="none")
        target = per.to(D)
    ref_leaves = [t.clone().requires_grad_(True) for t in (coef, proto, area)]
    logits = torch.einsum("nc,nchw->nhw", ref_leaves[0], ref_leaves[1][image])
    ref = F.cropped_mask_bce(logits, target, boxes=boxes, area=ref_leaves[2], reduction="none")
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-14)
    for a, b in zip(torch.autograd.grad(got.sum(), leaves), torch.autograd.grad(ref.sum(), ref_leaves)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_prototype_mask_bce_gradcheck_and_edges():
    coef, proto, image, maps, value, boxes, area = proto_case(seed=1, n=4, b=2, nm=3, h=4, w=5)
    args = tuple(t.clone().requires_grad_(True) for t in (coef, proto, area))
    assert gradcheck(lambda c, p, a: F.prototype_mask_bce(c, p, maps, boxes=boxes, area=a, image=image, mask_value=value), args)
    area[1] = 0.0  # zero area: contributes 0, no NaN
    big = value.clone()
    big[0] = 300  # cannot occur in a uint8 map: an empty target
    out = F.prototype_mask_bce(coef, proto, maps, boxes=boxes, area=area, image=image, mask_value=big, reduction="none")
    alone = F.prototype_mask_bce(coef[:1], proto, maps.to(torch.int64), boxes=boxes[:1], area=area[:1], image=image[:1],
                                 mask_value=big[:1], reduction="none")
    torch.testing.assert_close(out[:1], alone)
    assert float(out[1]) == 0.0 and torch.isfinite(out).all()
    empty = F.prototype_mask_bce(coef[:0], proto, maps, boxes=boxes[:0], area=area[:0], image=image[:0], mask_value=value[:0])
    assert float(empty) == 0.0
    with pytest.raises(ValueError, match=r"proto: expected \[B, 3, H, W\] or \[3, H, W\] prototypes"):
        F.prototype_mask_bce(coef, proto[:, :2], maps, boxes=boxes, area=area, image=image, mask_value=value)
    with pytest.raises(ValueError, match=r"masks: expected \[T, 4, 5\] \(the prototypes' size\), got \(2, 8, 10\)"):
        F.prototype_mask_bce(coef, proto, maps.repeat(1, 2, 2), boxes=boxes, area=area, image=image, mask_value=value)
    with pytest.raises(ValueError, match=r"image: expected indices in \[0, 1\]"):
        F.prototype_mask_bce(coef, proto, maps, boxes=boxes, area=area, image=image + 5, mask_value=value)
    with pytest.raises(ValueError, match=r"masks: expected one map per image"):
        F.prototype_mask_bce(coef, proto, maps[:1], boxes=boxes, area=area, image=image, mask_value=value)
