"""detloss.assign.yolov5 against the build_targets of ultralytics/yolov5 v7.0 ComputeLoss.

The oracle is :func:`build_targets_by_rules`, written here from the documented rules (the module
docstring of detloss.assign.yolov5: anchor ratio test, the own cell and the two nearest
neighbours, the order offset -> anchor -> target row), one target, anchor and offset at a time in
plain Python. The reference data in tests/data/yolov5_v7/ (manifest SOURCE: "ultralytics/yolov5
tag v7.0 (commit 915bbf294bb74c859f0b41f1c23bc395014ea679): utils/loss.py ComputeLoss, ...;
utils/metrics.py bbox_iou. Run unmodified on CPU in float64.") checks the whole loss, hence the
assignment, in tests/losses/test_yolov5.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detloss.assign.base import Assignment
from detloss.assign.yolov5 import OFFSET_NAMES, YOLOv5LevelAssignment, assign_yolov5, check_yolo_targets, grid_anchors

DATA = Path(__file__).resolve().parents[1] / "data" / "yolov5_v7"
ANCHORS = ((10, 13, 16, 30, 33, 23), (30, 61, 62, 45, 59, 119), (116, 90, 156, 198, 373, 326))
STRIDES = (8, 16, 32)


def build_targets_by_rules(rows, grid_size, anchors, anchor_t):
    """One level's positives as ``(offset, anchor, row)``-ordered tuples
    ``(image, anchor, gy, gx, class, (x, y, w, h), (aw, ah), row, offset)``.

    The rules: the target's centre and size in cells, ``g = (cx * nx, cy * ny)``,
    ``s = (w * nx, h * ny)``; anchor ``a`` matches when every ratio ``s / a`` and ``a / s`` is below
    ``anchor_t``; besides its own cell, the cell to the left is used when the centre is within half
    a cell of its left border and not in the first column (``gx % 1 < 0.5 and gx > 1``), likewise
    up, right (``(nx - gx) % 1 < 0.5 and nx - gx > 1``) and down; the cell is the one holding the
    centre moved half a cell toward that neighbour, clamped to the grid, and the box is the centre
    relative to that cell's corner with the size ``s``.
    """
    ny, nx = grid_size
    found = []
    for offset, (ox, oy) in enumerate(((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5))):
        for a, (aw, ah) in enumerate(anchors):
            for row, (img, cls, cx, cy, w, h) in enumerate(rows):
                gx, gy, sw, sh = cx * nx, cy * ny, w * nx, h * ny
                ratios = (sw / aw, sh / ah)
                if not max(max(r, 1 / r if r else math.inf) for r in ratios) < anchor_t:
                    continue
                use = (
                    True,
                    gx % 1 < 0.5 and gx > 1,
                    gy % 1 < 0.5 and gy > 1,
                    (nx - gx) % 1 < 0.5 and nx - gx > 1,
                    (ny - gy) % 1 < 0.5 and ny - gy > 1,
                )[offset]
                if not use:
                    continue
                cell_x = min(max(int(gx - ox), 0), nx - 1)
                cell_y = min(max(int(gy - oy), 0), ny - 1)
                found.append((int(img), a, cell_y, cell_x, int(cls), (gx - cell_x, gy - cell_y, sw, sh), (aw, ah), row, offset))
    return found


def _assert_same_as_rules(targets, grid_sizes, anchors, anchor_t):
    got = assign_yolov5(targets, grid_sizes, anchors, anchor_t)
    assert isinstance(got, Assignment) and len(got) == len(grid_sizes)
    rows = targets.tolist()
    for i, lvl in enumerate(got):
        want = build_targets_by_rules(rows, grid_sizes[i], anchors[i].tolist(), anchor_t)
        mine = list(zip(
            lvl.image.tolist(), lvl.anchor.tolist(), lvl.gy.tolist(), lvl.gx.tolist(), lvl.classes.tolist(),
            map(tuple, lvl.boxes.tolist()), map(tuple, lvl.anchors.tolist()), lvl.target_index.tolist(), lvl.offset.tolist(),
        ))
        assert mine == want, i
    # the flat positives are the levels', level after level
    assert got.num_pos == sum(lvl.num_pos for lvl in got)
    assert torch.equal(got.target_index, torch.cat([lvl.target_index for lvl in got]))
    return got


def _grid_anchors():
    return grid_anchors(ANCHORS, STRIDES)


# Coordinates that hit the rules' boundaries: exact half cells, cell borders, the image edges.
_edge_coords = st.sampled_from([0.0, 1.0, 0.5, 0.25, 1 / 64, 3 / 128, 63 / 64, 0.9921875, 0.999, 0.001])


@st.composite
def _targets(draw):
    n = draw(st.integers(0, 25))
    coord = st.one_of(st.floats(0.0, 1.0, allow_nan=False), _edge_coords)
    rows = []
    for _ in range(n):
        rows.append([
            draw(st.integers(0, 2)), draw(st.integers(0, 2)), draw(coord), draw(coord),
            draw(st.one_of(st.floats(0.0, 1.0), _edge_coords)), draw(st.one_of(st.floats(0.0, 1.0), _edge_coords)),
        ])
    return torch.tensor(rows, dtype=torch.float64).reshape(-1, 6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    targets=_targets(),
    size=st.sampled_from([(64, 64), (96, 160), (128, 64), (32, 32), (256, 96)]),
    anchor_t=st.sampled_from([4.0, 2.91, 1.5, 10.0]),
)
def test_matches_build_targets(targets, size, anchor_t):
    h, w = size
    grid_sizes = [(h // s, w // s) for s in STRIDES]
    got = _assert_same_as_rules(targets, grid_sizes, _grid_anchors(), anchor_t)
    for lvl, (ny, nx) in zip(got, grid_sizes):
        assert lvl.grid_size == (ny, nx)
        assert bool((lvl.gx >= 0).all() and (lvl.gx < nx).all() and (lvl.gy >= 0).all() and (lvl.gy < ny).all())
        assert bool((lvl.boxes[:, :2] >= -0.5).all() and (lvl.boxes[:, :2] <= 1.5).all())
        assert bool(((lvl.offset >= 0) & (lvl.offset < len(OFFSET_NAMES))).all())
        # each positive's anchor really matches its target's size
        r = lvl.boxes[:, 2:] / lvl.anchors
        assert bool((torch.max(r, 1 / r).max(1)[0] < anchor_t).all())


def _check_owner(lvl: YOLOv5LevelAssignment):
    keys = list(zip(lvl.image.tolist(), lvl.anchor.tolist(), lvl.gy.tolist(), lvl.gx.tolist()))
    last = {k: i for i, k in enumerate(keys)}  # plain dict: the last index of each key
    expected = [last[k] == i for i, k in enumerate(keys)]
    assert lvl.obj_owner.tolist() == expected
    return len(keys) - len(last)  # number of overwritten positives


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(targets=_targets())
def test_obj_owner_is_last_writer(targets):
    for lvl in assign_yolov5(targets, [(8, 8), (4, 4), (2, 2)], _grid_anchors()):
        _check_owner(lvl)


def test_reference_cases_contain_shared_cells_and_follow_the_rules():
    shared = 0
    for path in sorted(DATA.glob("c*.npz")):
        d = np.load(path)
        cfg = json.loads(str(d["config"]))
        targets = torch.from_numpy(d["targets"]).reshape(-1, 6)
        grid_sizes = [(cfg["img_h"] // s, cfg["img_w"] // s) for s in cfg["strides"]]
        got = _assert_same_as_rules(targets, grid_sizes, _grid_anchors(), cfg["hyp"]["anchor_t"])
        shared += sum(_check_owner(lvl) for lvl in got)
    assert shared > 0  # the parity tests do exercise the last-writer rule


def test_worked_example():
    # One target, 64x64 image, centre (0.30, 0.70), size (0.25, 0.5) -> level 0 grid 8x8:
    # gxy = (2.4, 5.6), gwh = (2, 4). Anchors (1.25, 1.625), (2, 3.75), (4.125, 2.875):
    # ratios max(r, 1/r): a0 -> max(1.6, 2.46) < 4 yes; a1 -> max(1, 1.07) yes; a2 -> 2.06 yes.
    # gx % 1 = 0.4 < 0.5 and gx > 1 -> left neighbour (gx - 0.5 = 1.9 -> cell 1);
    # gy % 1 = 0.6 -> no up; (8 - 5.6) % 1 = 0.4 < 0.5 and 2.4 > 1 -> down (gy + 0.5 = 6.1 -> 6).
    # Own cell (2, 5). So 3 anchors x {own, left, down} = 9 positives, offset-major.
    t = torch.tensor([[0, 2, 0.30, 0.70, 0.25, 0.5]], dtype=torch.float64)
    lvl = assign_yolov5(t, [(8, 8)], _grid_anchors()[:1])[0]
    assert lvl.offset.tolist() == [0, 0, 0, 1, 1, 1, 4, 4, 4]
    assert lvl.anchor.tolist() == [0, 1, 2] * 3
    assert lvl.gx.tolist() == [2, 2, 2, 1, 1, 1, 2, 2, 2]
    assert lvl.gy.tolist() == [5, 5, 5, 5, 5, 5, 6, 6, 6]
    torch.testing.assert_close(lvl.boxes[0], torch.tensor([0.4, 0.6, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(lvl.boxes[3], torch.tensor([1.4, 0.6, 2.0, 4.0], dtype=torch.float64))
    torch.testing.assert_close(lvl.boxes[6], torch.tensor([0.4, -0.4, 2.0, 4.0], dtype=torch.float64))
    assert lvl.classes.tolist() == [2] * 9 and lvl.target_index.tolist() == [0] * 9
    assert lvl.obj_owner.all()
    # Image edge: x = 1.0 on an 8-wide grid gives gx = 8, clamped to 7, box x relative to cell 7.
    t = torch.tensor([[0, 0, 1.0, 0.5625, 0.25, 0.25]], dtype=torch.float64)
    lvl = assign_yolov5(t, [(8, 8)], _grid_anchors()[:1])[0]
    own = lvl.offset == 0
    assert set(lvl.gx[own].tolist()) == {7}
    assert torch.all(lvl.boxes[own, 0] == 1.0)


def test_empty_targets():
    out = assign_yolov5(torch.zeros(0, 6), [(8, 8), (4, 4), (2, 2)], _grid_anchors())
    assert len(out) == 3
    for lvl in out:
        assert lvl.num_pos == 0 and lvl.boxes.shape == (0, 4) and lvl.anchors.shape == (0, 2)
        assert lvl.image.dtype == torch.long and lvl.obj_owner.dtype == torch.bool


def test_half_targets_use_float32():
    t = torch.tensor([[0, 1, 0.3, 0.7, 0.25, 0.5]], dtype=torch.float16)
    lvl = assign_yolov5(t, [(8, 8)], _grid_anchors()[:1])[0]
    assert lvl.boxes.dtype == torch.float32 and lvl.num_pos == 9


def test_bad_arguments():
    t = torch.tensor([[0, 1, 0.3, 0.7, 0.25, 0.5]], dtype=torch.float64)
    with pytest.raises(ValueError, match="grid_sizes: expected one"):
        assign_yolov5(t, [(8, 8)], _grid_anchors())
    with pytest.raises(ValueError, match=r"anchors: expected a \[na, 2\]"):
        assign_yolov5(t, [(8, 8)], [torch.ones(3)])
    with pytest.raises(ValueError, match="anchor_t"):
        assign_yolov5(t, [(8, 8)], _grid_anchors()[:1], anchor_t=0.0)
    with pytest.raises(ValueError, match=r"class < num_classes = 1, got 1 in row 0"):
        assign_yolov5(t, [(8, 8)], _grid_anchors()[:1], num_classes=1)
    with pytest.raises(ValueError, match=r"image index < the batch size.* = 1, got 1 in row 1"):
        check_yolo_targets(torch.cat((t, t + torch.tensor([1, 0, 0, 0, 0, 0]))), batch_size=1)
    with pytest.raises(ValueError, match="anchors: level 0 expected an even number"):
        grid_anchors([(10, 13, 16)], [8])
    with pytest.raises(ValueError, match="strides: level 0"):
        grid_anchors([(10, 13)], [0])
