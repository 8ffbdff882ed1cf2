"""The box coder (detloss.box_coder) and the anchor generators beyond the reference cases.

The reference parity of both (torchvision's codes, decoded boxes, anchors and default boxes) is
in test_retinanet_reference.py and test_ssd_reference.py.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss.anchor_generators import AnchorGenerator, DefaultBoxGenerator
from detloss.box_coder import BBOX_XFORM_CLIP, BoxCoder, decode_boxes, encode_boxes

side = st.floats(0.5, 500.0)
pos = st.floats(-200.0, 800.0)


@settings(max_examples=60, deadline=None)
@given(pos, pos, side, side, pos, pos, side, side, st.sampled_from([(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0), (2.0, 2.0, 1.0, 1.0)]))
def test_decode_inverts_encode(ax, ay, aw, ah, gx, gy, gw, gh, weights):
    anchor = torch.tensor([[ax, ay, ax + aw, ay + ah]], dtype=torch.float64)
    box = torch.tensor([[gx, gy, gx + gw, gy + gh]], dtype=torch.float64)
    coder = BoxCoder(weights, bbox_xform_clip=math.inf)
    torch.testing.assert_close(coder.decode(coder.encode(box, anchor), anchor), box, rtol=1e-9, atol=1e-9)


def test_codes_by_hand():
    anchor = torch.tensor([[0.0, 0.0, 10.0, 20.0]])
    box = torch.tensor([[5.0, 0.0, 25.0, 10.0]])
    # centres (5, 10) and (15, 5); sizes 10 x 20 and 20 x 10
    want = torch.tensor([[10 * 10 / 10, 10 * -5 / 20, 5 * math.log(2.0), 5 * math.log(0.5)]])
    torch.testing.assert_close(encode_boxes(box, anchor, weights=(10, 10, 5, 5)), want)


def test_decode_clamps_the_log_size_without_gradient_above_it():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]], dtype=torch.float64)
    codes = torch.tensor([[0.0, 0.0, 10.0, BBOX_XFORM_CLIP - 1]], dtype=torch.float64, requires_grad=True)
    boxes = decode_boxes(codes, anchor)
    assert boxes[0, 2].item() == pytest.approx(8 + 0.5 * 1000.0)  # exp(log(1000/16)) * 16 / 2 + 8
    (boxes[0, 2] + boxes[0, 3]).backward()  # x2 and y2 move with the width and height
    assert codes.grad[0, 2] == 0 and codes.grad[0, 3] != 0


def test_zero_size_box_encodes_finite():
    anchor = torch.tensor([[0.0, 0.0, 16.0, 16.0]])
    box = torch.tensor([[4.0, 4.0, 4.0, 9.0]])
    codes = encode_boxes(box, anchor)
    assert torch.isfinite(codes).all() and codes[0, 2] < -80


def test_gradcheck_decode_and_encode():
    g = torch.Generator().manual_seed(0)
    anchors = torch.tensor([[0.0, 0.0, 16.0, 8.0], [4.0, 2.0, 40.0, 50.0]], dtype=torch.float64)
    codes = torch.randn(3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c: decode_boxes(c, anchors, weights=(10, 10, 5, 5)), (codes,))
    boxes = torch.tensor([[1.0, 2.0, 9.0, 7.0], [3.0, 3.0, 30.0, 41.0]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: encode_boxes(b, anchors), (boxes,))


def test_half_precision_codes():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 8.0]], dtype=torch.float16)
    codes = torch.zeros(1, 4, dtype=torch.float16)
    assert decode_boxes(codes, anchors).dtype == torch.float16
    torch.testing.assert_close(decode_boxes(codes, anchors), anchors)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: BoxCoder((1.0, 1.0, 1.0)), "weights: expected 4 finite positive"),
        (lambda: BoxCoder((1.0, 1.0, -1.0, 1.0)), "weights: expected 4 finite positive"),
        (lambda: encode_boxes(torch.zeros(2, 3), torch.zeros(2, 4)), r"boxes: expected shape \[\.\.\., 4\]"),
        (lambda: decode_boxes(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4)), "codes: expected a floating-point tensor"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_anchor_layout():
    gen = AnchorGenerator(((32,),), ((0.5, 1.0, 2.0),))
    anchors = gen([(2, 3)], (16, 24))
    assert anchors.shape == (2 * 3 * 3, 4)
    # location (y=1, x=2) is the 6th, its 3 cell anchors follow one another; spacing 8 x 8
    loc = anchors[5 * 3 : 6 * 3]
    centres = (loc[:, :2] + loc[:, 2:]) / 2
    assert torch.equal(centres, torch.tensor([[16.0, 8.0]] * 3))
    assert torch.equal(loc - torch.tensor([16.0, 8.0, 16.0, 8.0]), torch.stack(gen.cell_anchors)[0])


def test_generator_arguments():
    with pytest.raises(ValueError, match="aspect_ratios: expected 2 levels like sizes"):
        AnchorGenerator(((32,), (64,)), ((1.0,),))
    with pytest.raises(ValueError, match="feature_sizes: expected 1 \\(H, W\\) pairs"):
        AnchorGenerator(((32,),), ((1.0,),))([(2, 2), (1, 1)], (16, 16))
    with pytest.raises(ValueError, match="scales: expected 3 values"):
        DefaultBoxGenerator([[2], [2]], scales=[0.1, 0.2])
    with pytest.raises(ValueError, match="steps: expected 2 values"):
        DefaultBoxGenerator([[2], [2]], steps=[8])
    assert DefaultBoxGenerator([[2]]).scales == (0.15, 0.9)
