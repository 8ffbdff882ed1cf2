"""The IoU matchers (RetinaNet's Matcher with low-quality matches, SSD's SSDMatcher) against a
dense statement of torchvision's rules, and the sparse pair search against the dense IoU matrix.

The dense oracle below builds the full boxes x anchors IoU matrix and applies the rules as
torchvision 0.29's ``_utils.Matcher`` / ``SSDMatcher`` documents them (the reference cases of
tests/data/torchvision_anchor/ pin them to torchvision's numbers: see
tests/losses/test_retinanet_reference.py and test_ssd_reference.py). Boxes are multiples of 1/8
on a small grid so that exact IoU ties, IoU exactly at a threshold, duplicates, zero-area boxes
and boxes outside every anchor all occur.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss.anchor_generators import AnchorGenerator
from detloss.assign.iou_matcher import AnchorIndexCache, assign_iou, assign_ssd, check_anchors, overlapping_pairs


def dense_iou(boxes, anchors):
    area_b = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    area_a = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    lt = torch.max(boxes[:, None, :2], anchors[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], anchors[None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    return inter / (area_b[:, None] + area_a[None, :] - inter)


def first_argmax(q, dim):
    best = q.max(dim=dim, keepdim=True).values
    idx = torch.arange(q.shape[dim]).view([-1 if d == dim else 1 for d in range(q.ndim)]).expand_as(q)
    return best.squeeze(dim), torch.where(q == best, idx, q.shape[dim]).min(dim=dim).values


def oracle_retinanet(boxes, anchors, fg, bg, low_quality):
    if boxes.shape[0] == 0:
        return torch.full((anchors.shape[0],), -1)
    q = dense_iou(boxes, anchors)
    v, m = first_argmax(q, 0)
    out = m.clone()
    out[v < bg] = -1
    out[(v >= bg) & (v < fg)] = -2
    if low_quality:
        gt_best = q.max(dim=1, keepdim=True).values
        rows = (q == gt_best).any(0)
        out[rows] = m[rows]
    return out


def oracle_ssd(boxes, anchors, thresh):
    if boxes.shape[0] == 0:
        return torch.full((anchors.shape[0],), -1)
    q = dense_iou(boxes, anchors)
    v, m = first_argmax(q, 0)
    out = torch.where(v >= thresh, m, torch.full_like(m, -1))
    _, best = first_argmax(q, 1)
    for g in range(boxes.shape[0]):  # the oracle's loop: the later box wins a shared anchor
        out[best[g]] = g
    return out


GRID_ANCHORS = AnchorGenerator(((8, 12), (16, 24)), ((0.5, 1.0, 2.0),) * 2)([(4, 4), (2, 2)], (32, 32), dtype=torch.float64)

coord = st.integers(-16, 8 * 40).map(lambda v: v / 8)


@st.composite
def box_sets(draw, max_boxes=8):
    n = draw(st.integers(0, max_boxes))
    rows = []
    for _ in range(n):
        x1, y1 = draw(coord), draw(coord)
        w = draw(st.sampled_from([0.0, 0.125, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0])) if draw(st.booleans()) else draw(coord).__abs__()
        h = draw(st.sampled_from([0.0, 0.125, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0])) if draw(st.booleans()) else draw(coord).__abs__()
        rows.append([x1, y1, x1 + w, y1 + h])
    boxes = torch.tensor(rows, dtype=torch.float64).reshape(-1, 4)
    if n >= 2 and draw(st.booleans()):  # a duplicate box
        boxes = torch.cat((boxes, boxes[:1]))
    return boxes


def targets_from(box_lists):
    return [{"boxes": b, "labels": torch.arange(b.shape[0]) % 3} for b in box_lists]


@settings(max_examples=80, deadline=None)
@given(st.lists(box_sets(), min_size=1, max_size=3), st.sampled_from([(0.5, 0.4), (0.6, 0.3), (0.5, 0.5), (0.4, 0.0)]), st.booleans())
def test_retinanet_matcher_equals_dense_rules(box_lists, thresholds, low_quality):
    fg, bg = thresholds
    asg = assign_iou(targets_from(box_lists), GRID_ANCHORS, fg_iou_thresh=fg, bg_iou_thresh=bg,
                     allow_low_quality_matches=low_quality)
    for i, boxes in enumerate(box_lists):
        assert torch.equal(asg.matched_idxs()[i], oracle_retinanet(boxes, GRID_ANCHORS, fg, bg, low_quality))


@settings(max_examples=80, deadline=None)
@given(st.lists(box_sets(), min_size=1, max_size=3), st.sampled_from([0.5, 0.4, 0.0]))
def test_ssd_matcher_equals_dense_rules(box_lists, thresh):
    asg = assign_ssd(targets_from(box_lists), GRID_ANCHORS, iou_thresh=thresh)
    for i, boxes in enumerate(box_lists):
        assert torch.equal(asg.matched_idxs()[i], oracle_ssd(boxes, GRID_ANCHORS, thresh))


@settings(max_examples=100, deadline=None)
@given(box_sets(12), st.sampled_from([0.0, 0.05, 0.3, 0.5, 0.9]), st.booleans())
def test_overlapping_pairs_are_the_nonzero_entries(boxes, min_iou, random_anchors):
    anchors = GRID_ANCHORS
    if random_anchors:  # anchors in no lattice, of many sizes
        g = torch.Generator().manual_seed(int(boxes.sum().item() * 8) % 1000)
        xy = torch.randint(0, 256, (60, 2), generator=g).double() / 8
        wh = torch.randint(1, 200, (60, 2), generator=g).double() / 8
        anchors = torch.cat((xy, xy + wh), 1)
    pb, pa, iou = overlapping_pairs(boxes, anchors, min_iou=min_iou)
    q = dense_iou(boxes, anchors)
    want = ((q > 0) & (q >= min_iou)).nonzero()
    got = torch.stack((pb, pa), 1)
    assert sorted(map(tuple, got.tolist())) == sorted(map(tuple, want.tolist()))
    assert torch.equal(iou, q[pb, pa])


def test_per_image_anchors_and_groups():
    a0 = GRID_ANCHORS
    a1 = GRID_ANCHORS + 3.0  # a different anchor set for image 1
    boxes = [torch.tensor([[2.0, 2.0, 14.0, 10.0]], dtype=torch.float64), torch.tensor([[5.0, 5.0, 17.0, 13.0]], dtype=torch.float64)]
    asg = assign_iou(targets_from(boxes), [a0, a1])
    assert torch.equal(asg.matched_idxs()[0], oracle_retinanet(boxes[0], a0, 0.5, 0.4, True))
    assert torch.equal(asg.matched_idxs()[1], oracle_retinanet(boxes[1], a1, 0.5, 0.4, True))
    same = assign_iou(targets_from(boxes), [a0, a0.clone()])
    assert torch.equal(torch.stack(same.matched_idxs()), torch.stack(assign_iou(targets_from(boxes), a0).matched_idxs()))


def test_box_outside_every_anchor_makes_the_whole_image_positive():
    # torchvision's behaviour: best IoU 0 is reached by every anchor, each reset to its own best box.
    boxes = torch.tensor([[4.0, 4.0, 12.0, 12.0], [500.0, 500.0, 510.0, 510.0]], dtype=torch.float64)
    asg = assign_iou(targets_from([boxes]), GRID_ANCHORS)
    m = asg.matched_idxs()[0]
    assert (m >= 0).all()
    assert torch.equal(m, oracle_retinanet(boxes, GRID_ANCHORS, 0.5, 0.4, True))
    assert not asg.extras["low_quality"][0][m == -2].any()


def test_empty_images_are_background():
    empty = torch.zeros((0, 4), dtype=torch.float64)
    box = torch.tensor([[4.0, 4.0, 12.0, 12.0]], dtype=torch.float64)
    for asg in (assign_iou(targets_from([empty, box]), GRID_ANCHORS, bg_iou_thresh=0.0),
                assign_ssd(targets_from([empty, box]), GRID_ANCHORS, iou_thresh=0.0)):
        assert (asg.matched_idxs()[0] == -1).all()
        assert (asg.batch_index == 1).all() and asg.num_pos > 0
    asg = assign_iou(targets_from([empty, empty]), GRID_ANCHORS)
    assert asg.num_pos == 0 and not asg.ignore.any()


def test_crowded_search_visits_few_pairs():
    # 100 boxes on 30k anchors: the pairs found are a small part of boxes x anchors.
    sizes = [(math.ceil(400 / s),) * 2 for s in (8, 16, 32, 64, 128)]
    anchors = AnchorGenerator()(sizes, (400, 400))
    g = torch.Generator().manual_seed(0)
    wh = torch.exp(torch.rand(100, 2, generator=g) * math.log(20)) * 8
    xy = torch.rand(100, 2, generator=g) * (400 - wh)
    boxes = torch.cat((xy, xy + wh), 1)
    pb, pa, iou = overlapping_pairs(boxes, anchors, min_iou=0.4)
    assert 0 < pb.numel() < 0.002 * boxes.shape[0] * anchors.shape[0]
    q = dense_iou(boxes.double(), anchors.double()).float()
    assert pb.numel() == int((q >= 0.4).sum())


@pytest.mark.parametrize(
    "anchors, match",
    [
        (torch.zeros(5, 4), "anchors: expected finite xyxy boxes with x2 > x1"),
        ([GRID_ANCHORS, GRID_ANCHORS[:-1]], r"anchors\[1\]: expected 120 anchors like anchors\[0\], got 119"),
        ([GRID_ANCHORS], "anchors: expected 2 tensors"),
        (torch.zeros(3, 3), "anchors: expected boxes of 4 coordinates"),
        ("boxes", "anchors: expected a tensor"),
        (torch.tensor([[0.0, 0.0, float("nan"), 1.0]]), "anchors: expected finite"),
    ],
)
def test_bad_anchors(anchors, match):
    with pytest.raises((ValueError, TypeError), match=match):
        check_anchors(anchors, 2)


def test_bad_targets_and_thresholds():
    box = torch.tensor([[4.0, 4.0, 2.0, 12.0]])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\]: expected xyxy boxes with x1 <= x2"):
        assign_iou(targets_from([box]), GRID_ANCHORS)
    ok = torch.tensor([[4.0, 4.0, 8.0, 12.0]])
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\]: expected class indices in \[0, 2\)"):
        assign_iou([{"boxes": ok, "labels": torch.tensor([2])}], GRID_ANCHORS, num_classes=2)
    with pytest.raises(ValueError, match="bg_iou_thresh: expected a value <= fg_iou_thresh"):
        assign_iou(targets_from([ok]), GRID_ANCHORS, fg_iou_thresh=0.3, bg_iou_thresh=0.4)
    with pytest.raises(ValueError, match="iou_thresh: expected a finite number"):
        assign_ssd(targets_from([ok]), GRID_ANCHORS, iou_thresh=float("nan"))
    with pytest.raises(ValueError, match=r"anchors: expected 1 tensors"):
        assign_ssd(targets_from([ok]), [GRID_ANCHORS, GRID_ANCHORS])


def test_index_cache_follows_the_anchors():
    cache = AnchorIndexCache()
    boxes = [torch.tensor([[2.0, 2.0, 14.0, 10.0]], dtype=torch.float64)]
    first = assign_iou(targets_from(boxes), GRID_ANCHORS, index_cache=cache)
    index = cache.get(GRID_ANCHORS[None])
    assert cache.get(GRID_ANCHORS.clone()[None]) is index  # equal anchors: the same index
    moved = GRID_ANCHORS + 4.0
    second = assign_iou(targets_from(boxes), moved, index_cache=cache)
    assert cache.get(moved[None]) is not index
    assert torch.equal(first.matched_idxs()[0], oracle_retinanet(boxes[0], GRID_ANCHORS, 0.5, 0.4, True))
    assert torch.equal(second.matched_idxs()[0], oracle_retinanet(boxes[0], moved, 0.5, 0.4, True))
