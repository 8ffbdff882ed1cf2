"""FCOS assignment: the candidate-window matcher against dense points x boxes implementations.

:func:`torchvision_dense_match` is written here from torchvision's matching rules as the module
docstring of detloss.assign.fcos states them (torchvision 0.29 ``FCOS.compute_loss``, run on the
anchors its ``AnchorGenerator`` makes, :func:`tv_anchors`), over every point and box at once;
``mmdet_dense_targets`` follows mmdetection 3.x ``FCOSHead._get_targets_single``. The reference
data (tests/data/torchvision_fcos/, SOURCE: "torchvision 0.29.1+cu130 ... FCOS.compute_loss
(matcher) -> FCOSHead.compute_loss. Run unmodified on CPU in float64.") pins the torchvision
matcher in test_fcos.py; here random boxes, many of them on point boundaries and with equal
areas, check the rules everywhere.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detloss.assign.fcos import _candidate_pairs, assign_fcos, make_point_grid


def torchvision_dense_match(anchors, counts, boxes, center_sampling_radius=1.5):
    """Box index per anchor point (-1: background), every (point, box) pair tested.

    A point (the anchor's centre, anchor side ``s``) is a candidate for a box when it lies
    strictly inside the box, within ``radius * s`` of the box centre in both axes (Chebyshev
    distance) and its largest distance to a side is strictly between ``4 s`` (0 on the first
    level) and ``8 s`` (infinite on the last). Candidates score ``1e8 - area`` in the boxes'
    dtype; the largest score wins, the lowest box index on ties, and a score under 1e-5 is no match.
    """
    n_points = anchors.shape[0]
    if boxes.shape[0] == 0:
        return torch.full((n_points,), -1, dtype=torch.int64)
    centre = (anchors[:, :2] + anchors[:, 2:]) / 2
    side = anchors[:, 2] - anchors[:, 0]
    px, py = centre[:, 0:1], centre[:, 1:2]
    x1, y1, x2, y2 = (boxes[:, k][None] for k in range(4))
    dist = torch.stack((px - x1, py - y1, x2 - px, y2 - py), -1)  # [points, boxes, 4]
    box_centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    near = torch.maximum((px - box_centre[None, :, 0]).abs(), (py - box_centre[None, :, 1]).abs())
    lower = 4 * side
    lower[: counts[0]] = 0
    upper = 8 * side
    upper[-counts[-1]:] = math.inf
    far = dist.max(-1).values
    ok = (dist.min(-1).values > 0) & (near < center_sampling_radius * side[:, None])
    ok &= (far > lower[:, None]) & (far < upper[:, None])
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    score = torch.where(ok, 1e8 - area[None], torch.zeros((), dtype=boxes.dtype))
    best = score.max(1).values
    index = torch.arange(boxes.shape[0]).expand_as(score)
    first = torch.where(score == best[:, None], index, boxes.shape[0]).min(1).values
    return torch.where(best < 1e-5, -1, first)


STRIDES = (8, 16, 32, 64, 128)


def _feature_sizes(h, w):
    return [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]


def tv_anchors(feature_sizes, image_size, dtype=torch.float64):
    """torchvision AnchorGenerator, one size per level (8..128), aspect ratio 1."""
    out, counts = [], []
    for (gh, gw), size in zip(feature_sizes, STRIDES):
        sy, sx = image_size[0] // gh, image_size[1] // gw
        base = (torch.tensor([-size, -size, size, size], dtype=dtype) / 2).round()
        shifts_x = torch.arange(0, gw, dtype=torch.int32) * sx
        shifts_y = torch.arange(0, gh, dtype=torch.int32) * sy
        yy, xx = torch.meshgrid(shifts_y, shifts_x, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack((xx, yy, xx, yy), dim=1)
        out.append((shifts.view(-1, 1, 4) + base.view(1, -1, 4)).reshape(-1, 4))
        counts.append(gh * gw)
    return torch.cat(out), counts


MMDET_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8))


def mmdet_points(feature_sizes, dtype=torch.float64):
    """mmdet MlvlPointGenerator(offset=0.5) points and their strides."""
    pts, strides = [], []
    for (h, w), s in zip(feature_sizes, STRIDES):
        sx = (torch.arange(0, w, dtype=dtype) + 0.5) * s
        sy = (torch.arange(0, h, dtype=dtype) + 0.5) * s
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        pts.append(torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=-1))
        strides.append(torch.full((h * w,), float(s), dtype=dtype))
    return torch.cat(pts), torch.cat(strides)


def mmdet_dense_targets(points, feature_sizes, gt_bboxes, gt_labels, num_classes, center_sampling, radius=1.5):
    """mmdet FCOSHead._get_targets_single: labels (background = num_classes), ltrb targets, and
    the matched box index (-1 background) that mmdet keeps implicit."""
    num_points_per_lvl = [h * w for h, w in feature_sizes]
    regress_ranges = torch.cat(
        [points.new_tensor(r)[None].expand(n, 2) for r, n in zip(MMDET_RANGES, num_points_per_lvl)]
    )
    INF = 1e8
    num_points = points.size(0)
    num_gts = gt_labels.size(0)
    if num_gts == 0:
        return (
            gt_labels.new_full((num_points,), num_classes),
            gt_bboxes.new_zeros((num_points, 4)),
            torch.full((num_points,), -1, dtype=torch.int64),
        )
    areas = (gt_bboxes[:, 2] - gt_bboxes[:, 0]) * (gt_bboxes[:, 3] - gt_bboxes[:, 1])
    areas = areas[None].repeat(num_points, 1)
    regress_ranges = regress_ranges[:, None, :].expand(num_points, num_gts, 2)
    gt_bboxes = gt_bboxes[None].expand(num_points, num_gts, 4)
    xs, ys = points[:, 0], points[:, 1]
    xs = xs[:, None].expand(num_points, num_gts)
    ys = ys[:, None].expand(num_points, num_gts)
    left = xs - gt_bboxes[..., 0]
    right = gt_bboxes[..., 2] - xs
    top = ys - gt_bboxes[..., 1]
    bottom = gt_bboxes[..., 3] - ys
    bbox_targets = torch.stack((left, top, right, bottom), -1)
    if center_sampling:
        center_xs = (gt_bboxes[..., 0] + gt_bboxes[..., 2]) / 2
        center_ys = (gt_bboxes[..., 1] + gt_bboxes[..., 3]) / 2
        center_gts = torch.zeros_like(gt_bboxes)
        stride = center_xs.new_zeros(center_xs.shape)
        lvl_begin = 0
        for lvl_idx, num_points_lvl in enumerate(num_points_per_lvl):
            lvl_end = lvl_begin + num_points_lvl
            stride[lvl_begin:lvl_end] = STRIDES[lvl_idx] * radius
            lvl_begin = lvl_end
        x_mins = center_xs - stride
        y_mins = center_ys - stride
        x_maxs = center_xs + stride
        y_maxs = center_ys + stride
        center_gts[..., 0] = torch.where(x_mins > gt_bboxes[..., 0], x_mins, gt_bboxes[..., 0])
        center_gts[..., 1] = torch.where(y_mins > gt_bboxes[..., 1], y_mins, gt_bboxes[..., 1])
        center_gts[..., 2] = torch.where(x_maxs > gt_bboxes[..., 2], gt_bboxes[..., 2], x_maxs)
        center_gts[..., 3] = torch.where(y_maxs > gt_bboxes[..., 3], gt_bboxes[..., 3], y_maxs)
        cb_dist_left = xs - center_gts[..., 0]
        cb_dist_right = center_gts[..., 2] - xs
        cb_dist_top = ys - center_gts[..., 1]
        cb_dist_bottom = center_gts[..., 3] - ys
        center_bbox = torch.stack((cb_dist_left, cb_dist_top, cb_dist_right, cb_dist_bottom), -1)
        inside_gt_bbox_mask = center_bbox.min(-1)[0] > 0
    else:
        inside_gt_bbox_mask = bbox_targets.min(-1)[0] > 0
    max_regress_distance = bbox_targets.max(-1)[0]
    inside_regress_range = (max_regress_distance >= regress_ranges[..., 0]) & (
        max_regress_distance <= regress_ranges[..., 1]
    )
    areas[inside_gt_bbox_mask == 0] = INF
    areas[inside_regress_range == 0] = INF
    min_area, min_area_inds = areas.min(dim=1)
    labels = gt_labels[min_area_inds]
    labels[min_area == INF] = num_classes
    bbox_targets = bbox_targets[range(num_points), min_area_inds]
    return labels, bbox_targets, torch.where(min_area == INF, -1, min_area_inds)


# ------------------------------------------------------------------ random scenes


@st.composite
def scenes(draw):
    h = draw(st.integers(16, 200))
    w = draw(st.integers(16, 200))
    batch = draw(st.integers(1, 2))
    grid = draw(st.sampled_from([1.0, 4.0, 8.0]))  # snap to a lattice: boundaries and equal areas
    images = []
    for _ in range(batch):
        n = draw(st.integers(0, 10))
        boxes = []
        for _ in range(n):
            x1 = draw(st.integers(-10, w + 5)) * 1.0
            y1 = draw(st.integers(-10, h + 5)) * 1.0
            bw = draw(st.integers(0, 2 * max(h, w))) * 1.0
            bh = draw(st.integers(0, 2 * max(h, w))) * 1.0
            box = [x1, y1, x1 + bw, y1 + bh]
            boxes.append([round(v / grid) * grid for v in box])
        if boxes and draw(st.booleans()):
            boxes.append(list(boxes[0]))  # an exact duplicate: same area, a tie
        images.append(torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4))
    return (h, w), images


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scene=scenes(), radius=st.sampled_from([1.0, 1.5, 2.5]))
def test_torchvision_matches_dense(scene, radius):
    (h, w), images = scene
    fs = _feature_sizes(h, w)
    anchors, counts = tv_anchors(fs, (h, w))
    ours = assign_fcos(images, fs, STRIDES, center_sampling_radius=radius, image_size=(h, w)).matched_idxs()
    for i, boxes in enumerate(images):
        ref = torchvision_dense_match(anchors, counts, boxes, center_sampling_radius=radius)
        assert torch.equal(ours[i], ref)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scene=scenes(), center_sampling=st.booleans(), radius=st.sampled_from([1.0, 1.5, 2.5]))
def test_mmdet_matches_dense(scene, center_sampling, radius):
    (h, w), images = scene
    fs = _feature_sizes(h, w)
    points, _ = mmdet_points(fs)
    ours = assign_fcos(
        images, fs, STRIDES, convention="mmdet", center_sampling_radius=radius if center_sampling else None
    )
    assert torch.equal(ours.grid.points, points)
    for i, boxes in enumerate(images):
        labels = torch.zeros(len(boxes), dtype=torch.int64)
        *_, ref = mmdet_dense_targets(points, fs, boxes, labels, 1, center_sampling, radius)
        assert torch.equal(ours.matched_idxs()[i], ref)


@settings(max_examples=25, deadline=None)
@given(scene=scenes())
def test_torchvision_without_center_sampling_matches_dense(scene):
    # no centre sampling = an infinite radius in the dense implementation
    (h, w), images = scene
    fs = _feature_sizes(h, w)
    anchors, counts = tv_anchors(fs, (h, w))
    ours = assign_fcos(images, fs, STRIDES, center_sampling_radius=None, image_size=(h, w)).matched_idxs()
    for i, boxes in enumerate(images):
        assert torch.equal(ours[i], torchvision_dense_match(anchors, counts, boxes, center_sampling_radius=math.inf))


def test_float32_boxes_follow_torchvision_float32_rounding():
    # In float32, 1e8 - area rounds to multiples of 8: areas 1000 and 1003 tie, the lower index wins.
    boxes = torch.tensor([[0.0, 0.0, 40.0, 25.075], [0.0, 0.0, 40.0, 25.0]], dtype=torch.float32)
    fs = _feature_sizes(64, 64)
    anchors, counts = tv_anchors(fs, (64, 64), dtype=torch.float32)
    ref = torchvision_dense_match(anchors, counts, boxes)
    ours = assign_fcos([boxes], fs, STRIDES).matched_idxs()[0]
    assert (ref == 0).any()
    assert torch.equal(ours, ref)


def test_levels_and_foreground_helpers():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 40.0], [0.0, 0.0, 120.0, 120.0]])
    a = assign_fcos([boxes], _feature_sizes(128, 128), STRIDES)
    assert a.levels.shape == a.matched_idxs()[0].shape
    per_level = a.num_pos_per_level()
    assert sum(per_level) == int(a.foreground().sum())
    assert per_level[0] > 0 and sum(per_level[1:]) > 0


def test_crowded_image_memory_grows_with_candidates_not_points_x_boxes():
    # 640 x 640, 8525 points, 1000 boxes: the dense matcher holds 8.5M pairs per tensor; the
    # candidate windows hold a few dozen per box.
    torch.manual_seed(0)
    n = 1000
    xy = torch.rand(n, 2) * 600
    wh = torch.rand(n, 2) * 200 + 2
    boxes = torch.cat((xy, (xy + wh).clamp(max=640)), dim=1)
    fs = _feature_sizes(640, 640)
    grid = make_point_grid(fs, STRIDES, dtype=torch.float32)
    box, point = _candidate_pairs(boxes, grid, "torchvision")
    assert len(box) < 20 * n
    a = assign_fcos([boxes], fs, STRIDES)
    assert int(a.foreground().sum()) > 0
    # without centre sampling the windows stay bounded by the level ranges
    grid = make_point_grid(fs, STRIDES, center_sampling_radius=None, dtype=torch.float32)
    box, _ = _candidate_pairs(boxes, grid, "torchvision")
    assert len(box) < 300 * n


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"targets\[1\]\['boxes'\]: expected shape \[n, 4\]"):
        assign_fcos([torch.zeros(0, 4), {"boxes": torch.zeros(2, 3)}], _feature_sizes(64, 64))
    with pytest.raises(ValueError, match=r"convention"):
        assign_fcos([torch.zeros(0, 4)], _feature_sizes(64, 64), convention="x")
    with pytest.raises(TypeError, match=r"targets: expected a list"):
        assign_fcos(torch.zeros(0, 4), _feature_sizes(64, 64))
    with pytest.raises(ValueError, match=r"center_sampling_radius"):
        assign_fcos([torch.zeros(0, 4)], _feature_sizes(64, 64), center_sampling_radius=-1.0)
