"""FCOS assignment: the candidate-window matcher against dense points x boxes implementations.

:func:`torchvision_dense_match` and :func:`mmdet_dense_match` are written here from the matching
rules the module docstring of detloss.assign.fcos states (torchvision 0.29 ``FCOS.compute_loss``
on the points and anchor sides of :func:`tv_points`; mmdetection 3.x ``FCOSHead``'s targets on the
cell centres of :func:`mmdet_points`), testing every point against every box at once; neither is
a copy of the originals' code. The reference data (tests/data/torchvision_fcos/, SOURCE:
"torchvision 0.29.1+cu130 ... FCOS.compute_loss (matcher) -> FCOSHead.compute_loss. Run unmodified
on CPU in float64.") pins the torchvision matcher in test_fcos.py; here random boxes, many of them
on point boundaries and with equal areas, check the rules everywhere.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detloss.assign.fcos import _candidate_pairs, assign_fcos, make_point_grid


def torchvision_dense_match(points, sides, counts, boxes, center_sampling_radius=1.5):
    """Box index per point (-1: background), every (point, box) pair tested.

    A point (anchor side ``s``) is a candidate for a box when it lies strictly inside the box,
    within ``radius * s`` of the box centre in both axes (Chebyshev distance) and its largest
    distance to a side is strictly between ``4 s`` (0 on the first level) and ``8 s`` (infinite
    on the last). Candidates score ``1e8 - area`` in the boxes' dtype; the largest score wins,
    the lowest box index on ties, and a score under 1e-5 is no match.
    """
    n_points = points.shape[0]
    if boxes.shape[0] == 0:
        return torch.full((n_points,), -1, dtype=torch.int64)
    points, sides = points.to(boxes.dtype), sides.to(boxes.dtype)
    px, py = points[:, 0:1], points[:, 1:2]
    x1, y1, x2, y2 = (boxes[:, k][None] for k in range(4))
    dist = torch.stack((px - x1, py - y1, x2 - px, y2 - py), -1)  # [points, boxes, 4]
    box_centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    near = torch.maximum((px - box_centre[None, :, 0]).abs(), (py - box_centre[None, :, 1]).abs())
    lower = 4 * sides
    lower[: counts[0]] = 0
    upper = 8 * sides
    upper[-counts[-1]:] = math.inf
    far = dist.max(-1).values
    ok = (dist.min(-1).values > 0) & (near < center_sampling_radius * sides[:, None])
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


def tv_points(feature_sizes, image_size):
    """torchvision's points and anchor sides, one square anchor per point: level ``l`` of
    ``H x W`` cells puts its points at ``(x * (img_w // W), y * (img_h // H))``, anchors of side
    ``STRIDES[l]`` (8 .. 128) centred on them. Returns points ``[P, 2]``, sides ``[P]`` and the
    number of points per level."""
    points, sides, counts = [], [], []
    for (gh, gw), side in zip(feature_sizes, STRIDES):
        ys, xs = torch.meshgrid(torch.arange(gh) * (image_size[0] // gh), torch.arange(gw) * (image_size[1] // gw), indexing="ij")
        points.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), 1).to(torch.float64))
        sides.append(torch.full((gh * gw,), float(side), dtype=torch.float64))
        counts.append(gh * gw)
    return torch.cat(points), torch.cat(sides), counts


MMDET_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, 1e8))


def mmdet_points(feature_sizes, dtype=torch.float64):
    """mmdet's points: cell centres ``((x + 0.5) s, (y + 0.5) s)`` of each level, and their strides."""
    pts, strides = [], []
    for (h, w), s in zip(feature_sizes, STRIDES):
        ys, xs = torch.meshgrid((torch.arange(h, dtype=dtype) + 0.5) * s, (torch.arange(w, dtype=dtype) + 0.5) * s, indexing="ij")
        pts.append(torch.stack((xs.reshape(-1), ys.reshape(-1)), dim=-1))
        strides.append(torch.full((h * w,), float(s), dtype=dtype))
    return torch.cat(pts), torch.cat(strides)


def mmdet_dense_match(points, strides, feature_sizes, boxes, center_sampling, radius=1.5):
    """Box index per point (-1: background) under mmdet's rules, every (point, box) pair tested.

    A point of stride ``s`` on level ``l`` is a candidate for a box when it lies strictly inside
    the box (with centre sampling: strictly inside the box's centre ``-/+ radius * s`` clipped to
    the box) and its largest distance to a side lies in ``MMDET_RANGES[l]``, bounds included.
    The candidate box of smallest area wins, the lowest index on ties; an area of 1e8 or more
    is no match.
    """
    if boxes.shape[0] == 0:
        return torch.full((points.shape[0],), -1, dtype=torch.int64)
    level = torch.cat([torch.full((h * w,), i) for i, (h, w) in enumerate(feature_sizes)])
    lower = torch.tensor([r[0] for r in MMDET_RANGES], dtype=points.dtype)[level][:, None]
    upper = torch.tensor([r[1] for r in MMDET_RANGES], dtype=points.dtype)[level][:, None]
    px, py = points[:, 0:1], points[:, 1:2]
    x1, y1, x2, y2 = (boxes[:, k][None] for k in range(4))
    far = torch.stack((px - x1, py - y1, x2 - px, y2 - py), -1).max(-1).values
    if center_sampling:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        half = radius * strides[:, None]
        x1, x2 = torch.maximum(cx - half, x1), torch.minimum(cx + half, x2)
        y1, y2 = torch.maximum(cy - half, y1), torch.minimum(cy + half, y2)
    inside = (px > x1) & (px < x2) & (py > y1) & (py < y2)
    ok = inside & (far >= lower) & (far <= upper)
    area = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))[None].expand_as(ok)
    area = torch.where(ok, area, torch.full_like(area, math.inf))
    best = area.min(1).values
    index = torch.arange(boxes.shape[0]).expand_as(area)
    first = torch.where(area == best[:, None], index, boxes.shape[0]).min(1).values
    return torch.where(best >= 1e8, -1, first)


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
    points, sides, counts = tv_points(fs, (h, w))
    ours = assign_fcos(images, fs, STRIDES, center_sampling_radius=radius, image_size=(h, w)).matched_idxs()
    for i, boxes in enumerate(images):
        ref = torchvision_dense_match(points, sides, counts, boxes, center_sampling_radius=radius)
        assert torch.equal(ours[i], ref)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scene=scenes(), center_sampling=st.booleans(), radius=st.sampled_from([1.0, 1.5, 2.5]))
def test_mmdet_matches_dense(scene, center_sampling, radius):
    (h, w), images = scene
    fs = _feature_sizes(h, w)
    points, strides = mmdet_points(fs)
    ours = assign_fcos(
        images, fs, STRIDES, convention="mmdet", center_sampling_radius=radius if center_sampling else None
    )
    assert torch.equal(ours.grid.points, points)
    for i, boxes in enumerate(images):
        ref = mmdet_dense_match(points, strides, fs, boxes, center_sampling, radius)
        assert torch.equal(ours.matched_idxs()[i], ref)


@settings(max_examples=25, deadline=None)
@given(scene=scenes())
def test_torchvision_without_center_sampling_matches_dense(scene):
    # no centre sampling = an infinite radius in the dense implementation
    (h, w), images = scene
    fs = _feature_sizes(h, w)
    points, sides, counts = tv_points(fs, (h, w))
    ours = assign_fcos(images, fs, STRIDES, center_sampling_radius=None, image_size=(h, w)).matched_idxs()
    for i, boxes in enumerate(images):
        assert torch.equal(ours[i], torchvision_dense_match(points, sides, counts, boxes, center_sampling_radius=math.inf))


def test_float32_boxes_follow_torchvision_float32_rounding():
    # In float32, 1e8 - area rounds to multiples of 8: areas 1000 and 1003 tie, the lower index wins.
    boxes = torch.tensor([[0.0, 0.0, 40.0, 25.075], [0.0, 0.0, 40.0, 25.0]], dtype=torch.float32)
    fs = _feature_sizes(64, 64)
    points, sides, counts = tv_points(fs, (64, 64))
    ref = torchvision_dense_match(points, sides, counts, boxes)
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


def test_the_dense_rules_reproduce_the_stored_torchvision_matches():
    """The oracle itself against torchvision's recorded anchors and matched_idxs."""
    import json
    from pathlib import Path

    import numpy as np

    data = Path(__file__).resolve().parents[1] / "data" / "torchvision_fcos"
    for path in sorted(data.glob("fcos_*.npz")):
        d = np.load(path)
        cfg = json.loads(str(d["config"]))
        if tuple(cfg["strides"]) != STRIDES:
            continue
        fs = [tuple(s) for s in cfg["feature_sizes"]]
        points, sides, counts = tv_points(fs, (cfg["img_h"], cfg["img_w"]))
        anchors = torch.from_numpy(d["anchors"][0])
        assert torch.equal(points, (anchors[:, :2] + anchors[:, 2:]) / 2)
        assert torch.equal(sides, anchors[:, 2] - anchors[:, 0])
        for i, n in enumerate(d["gt_counts"]):
            boxes = torch.from_numpy(d["gt_boxes"][i, :n])
            ref = torchvision_dense_match(points, sides, counts, boxes, cfg["center_sampling_radius"])
            assert torch.equal(ref, torch.from_numpy(d["matched_idxs"][i])), path.name
