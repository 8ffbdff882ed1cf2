"""The shared assigner pieces: Assignment's dense views and rank_in_group against plain Python,
and the point grids and candidate windows of detloss.anchors."""
from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss.anchors import grid_points, make_anchors, per_point, window_cells
from detloss.assign.base import BACKGROUND, IGNORED, Assignment, rank_in_group


def _ranks_by_hand(group, value, descending):
    """For each element, how many elements of its group come before it in the documented order."""
    n = len(group)
    out = []
    for i in range(n):
        before = 0
        for j in range(n):
            if j == i or group[j] != group[i]:
                continue
            if value is None:
                before += (j > i) if descending else (j < i)
            elif descending:
                before += value[j] > value[i] or (value[j] == value[i] and j < i)
            else:
                before += value[j] < value[i] or (value[j] == value[i] and j < i)
        out.append(before)
    return out


@settings(max_examples=80, deadline=None)
@given(
    data=st.lists(st.tuples(st.integers(0, 4), st.sampled_from([0.0, 0.5, 1.0, 2.0, -1.0])), max_size=30),
    use_value=st.booleans(),
    descending=st.booleans(),
)
def test_rank_in_group_matches_plain_python(data, use_value, descending):
    group = torch.tensor([g for g, _ in data], dtype=torch.int64)
    value = torch.tensor([v for _, v in data], dtype=torch.float64) if use_value else None
    got = rank_in_group(group, value, descending=descending)
    assert got.dtype == torch.int64
    assert got.tolist() == _ranks_by_hand(group.tolist(), None if value is None else value.tolist(), descending)


def test_rank_in_group_last_writer_and_best():
    key = torch.tensor([3, 1, 3, 3, 1, 7])
    assert (rank_in_group(key) == 0).tolist() == [False, False, False, True, True, True]
    score = torch.tensor([0.5, 0.2, 0.9, 0.9, 0.1, 0.0])
    assert (rank_in_group(key, score) == 0).tolist() == [False, True, True, False, False, True]


def test_assignment_dense_views():
    a = Assignment(
        batch_index=torch.tensor([0, 1, 1]),
        pred_index=torch.tensor([2, 0, 0]),
        target_index=torch.tensor([4, 1, 2]),
        boxes=torch.zeros(3, 4),
        labels=torch.tensor([0, 1, 1]),
        weights=torch.ones(3),
        batch_size=2,
        num_preds=3,
        ignore=torch.tensor([[True, False, False], [False, False, True]]),
    )
    assert a.num_pos == 3
    assert a.foreground().tolist() == [[False, False, True], [True, False, False]]
    assert a.background().tolist() == [[False, True, False], [False, True, False]]
    m = a.matched_idxs()
    assert m[0].tolist() == [IGNORED, BACKGROUND, 4] and m[1].tolist() == [2, BACKGROUND, IGNORED]
    sub = a.select(torch.tensor([True, False, True]))
    assert sub.num_pos == 2 and sub.target_index.tolist() == [4, 2]


def test_grid_points_layout():
    pts = grid_points([(2, 3), (1, 2)], [(8.0, 4.0), (16.0, 16.0)], offset=0.5, dtype=torch.float64)
    by_hand = [((x + 0.5) * 8.0, (y + 0.5) * 4.0) for y in range(2) for x in range(3)]
    by_hand += [((x + 0.5) * 16.0, 8.0) for x in range(2)]
    assert pts.tolist() == [list(p) for p in by_hand]
    corner = grid_points([(2, 2)], [(5.0, 7.0)], offset=0.0, dtype=torch.float64)
    assert corner.tolist() == [[0.0, 0.0], [5.0, 0.0], [0.0, 7.0], [5.0, 7.0]]
    assert per_point([8.0, 16.0], [(2, 3), (1, 2)], dtype=torch.float64).tolist() == [8.0] * 6 + [16.0] * 2
    points, strides = make_anchors([(2, 3, 8.0), (1, 2, 16.0)], torch.float64)
    assert torch.equal(points * strides, grid_points([(2, 3), (1, 2)], [(8.0, 8.0), (16.0, 16.0)], dtype=torch.float64))


def test_window_cells_enumerates_every_cell_row_major():
    start = torch.tensor([[1, 2], [0, 0], [5, 5]])
    count = torch.tensor([[2, 3], [0, 4], [1, -2]])  # the second and third are empty
    rect, ix, iy = window_cells(start, count)
    assert rect.tolist() == [0] * 6
    assert list(zip(ix.tolist(), iy.tolist())) == [(x, y) for y in (2, 3, 4) for x in (1, 2)]
