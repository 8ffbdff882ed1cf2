"""The task-aligned engine (detloss.assign.aligned) and the rotated / pose / segmentation assigners:
against a dense [B, M, A] computation of the same rule written out here, against
TaskAlignedAssigner for the detection rule, and the schemes' candidate tests on their own.

Their parity with ultralytics 8.4.190 (fg_mask, target_gt_idx, target_scores of the reference
cases) is tested in tests/losses/test_obb.py, test_pose.py and test_segment.py.
"""
from __future__ import annotations

import pytest
import torch

import detloss.functional as F
from detloss.assign.aligned import BoxTaskAlignedAssigner, box_ciou
from detloss.assign.pose import PoseTaskAlignedAssigner
from detloss.assign.rotated import RotatedTaskAlignedAssigner, points_in_rboxes
from detloss.assign.tal import TaskAlignedAssigner, anchor_grid, enlarge_small_boxes

LEVELS = [(8, 8, 8.0), (4, 4, 16.0), (2, 2, 32.0)]
D = torch.float64


def scene(bsz=2, m=4, nc=3, seed=0, spread=6.0):
    g = torch.Generator().manual_seed(seed)
    pts = anchor_grid(LEVELS, D, torch.device("cpu"))
    a = pts.shape[0]
    c = torch.rand(bsz, m, 2, generator=g, dtype=D) * 40 + 12
    wh = torch.rand(bsz, m, 2, generator=g, dtype=D) * 30 + 4
    gt = torch.cat((c - wh / 2, c + wh / 2), -1)
    labels = torch.randint(0, nc, (bsz, m), generator=g)
    mask = torch.rand(bsz, m, generator=g) > 0.2
    gt = gt * mask[..., None]
    pd_c = pts + torch.randn(bsz, a, 2, generator=g, dtype=D) * spread
    pd_wh = torch.rand(bsz, a, 2, generator=g, dtype=D) * 30 + 2
    pd = torch.cat((pd_c - pd_wh / 2, pd_c + pd_wh / 2), -1)
    scores = torch.rand(bsz, a, nc, generator=g, dtype=D)
    return scores, pd, labels, gt, mask, pts


def inside_boxes(gt, pts, min_side=16.0):
    """[B, M, A]: anchor centres strictly inside the boxes widened to min_side (the detection rule)."""
    e = enlarge_small_boxes(gt, min_side)
    return ((torch.minimum(pts[:, 0] - e[..., None, 0], pts[:, 1] - e[..., None, 1]) > 1e-9)
            & (torch.minimum(e[..., None, 2] - pts[:, 0], e[..., None, 3] - pts[:, 1]) > 1e-9))


def dense_rule(scores, pd, labels, gt, mask, inside, overlap_fn, topk, topk2, alpha=0.5, beta=6.0, eps=1e-9):
    """The task-aligned rule over [B, M, A], torch.topk over every anchor (zero ties included)."""
    bsz, m, a = inside.shape
    cand = inside & mask[..., None]
    overlaps = torch.zeros(bsz, m, a, dtype=D)
    b, g, an = cand.nonzero(as_tuple=True)
    overlaps[b, g, an] = overlap_fn(b, g, an)
    score = torch.zeros(bsz, m, a, dtype=D)
    score[b, g, an] = scores[b, an, labels[b, g]]
    metric = score ** alpha * overlaps ** beta
    top = torch.topk(metric, topk, dim=-1).indices
    pos = torch.zeros(bsz, m, a, dtype=torch.bool).scatter_(-1, top, True) & cand
    multi = pos.sum(1, keepdim=True) > 1
    best = torch.zeros_like(pos).scatter_(1, overlaps.argmax(1, keepdim=True), True)
    pos = torch.where(multi, best, pos)
    if topk2 != topk:
        top2 = torch.topk(metric * pos, topk2, dim=-1).indices
        pos &= torch.zeros_like(pos).scatter_(-1, top2, True)
    fg = pos.any(1)
    idx = pos.to(torch.uint8).argmax(1)
    mm = metric * pos
    norm = (mm * (overlaps * pos).amax(-1, keepdim=True) / (mm.amax(-1, keepdim=True) + eps)).amax(1)
    return fg, idx, norm


@pytest.mark.parametrize("topk,topk2", [(10, 10), (7, 1), (3, 3)])
@pytest.mark.parametrize("seed", range(4))
def test_box_rule_equals_the_dense_rule_and_tal(seed, topk, topk2):
    scores, pd, labels, gt, mask, pts = scene(seed=seed)
    inside = inside_boxes(gt, pts)
    fg, idx, norm = dense_rule(scores, pd, labels, gt, mask, inside, lambda b, g, a: box_ciou(gt[b, g], pd[b, a]), topk, topk2)
    asg = BoxTaskAlignedAssigner(topk, 3, topk2=topk2).assign(scores, pd, labels, gt, mask, LEVELS)
    assert torch.equal(asg.fg_mask, fg)
    assert torch.equal(asg.target_gt_idx[fg], idx[fg])
    torch.testing.assert_close(asg.target_scores.sum(-1), torch.where(fg, norm, 0.0), rtol=1e-12, atol=1e-15)
    # without the zero ties: TaskAlignedAssigner's result
    ref = TaskAlignedAssigner(topk, 3, topk2=topk2).assign(scores, pd, pts, labels, gt, mask, LEVELS)
    mine = BoxTaskAlignedAssigner(topk, 3, topk2=topk2, zero_ties=False).assign(scores, pd, labels, gt, mask, LEVELS)
    assert torch.equal(mine.fg_mask, ref.fg_mask)
    assert torch.equal(mine.target_gt_idx, ref.target_gt_idx)
    torch.testing.assert_close(mine.target_scores, ref.target_scores, rtol=0, atol=0)


def test_zero_ties_add_zero_score_positives():
    """Far-off predictions: CIoU < 0, every alignment is 0. The reference still fills each box's
    top-k slots with zero-alignment anchors (torch.topk's choice); those inside the box become
    positives of score 0. With one box covering every anchor they all are."""
    scores, pd, labels, gt, mask, pts = scene(seed=3)
    pd = pd + 500.0
    for g in (gt, torch.tensor([[[0.0, 0.0, 64.0, 64.0]], [[0.0, 0.0, 0.0, 0.0]]], dtype=D)):
        m = g.sum(-1) > 0
        lab = labels[:, : g.shape[1]]
        fg, _, _ = dense_rule(scores, pd, lab, g, m, inside_boxes(g, pts), lambda b, gg, a: box_ciou(g[b, gg], pd[b, a]), 10, 10)
        with_ties = BoxTaskAlignedAssigner(10, 3).assign(scores, pd, lab, g, m, LEVELS)
        without = BoxTaskAlignedAssigner(10, 3, zero_ties=False).assign(scores, pd, lab, g, m, LEVELS)
        assert without.num_pos == 0
        assert torch.equal(with_ties.fg_mask, fg)
        assert float(with_ties.target_scores.abs().sum()) == 0.0
    assert with_ties.num_pos == 10


def test_points_in_rboxes_by_rotation():
    g = torch.Generator().manual_seed(0)
    boxes = torch.cat((torch.rand(50, 2, generator=g, dtype=D) * 20, torch.rand(50, 2, generator=g, dtype=D) * 8 + 1,
                       torch.rand(50, 1, generator=g, dtype=D) * 3 - 1), 1)
    pts = torch.rand(50, 400, 2, generator=g, dtype=D) * 30 - 5
    got = points_in_rboxes(pts, boxes[:, None, :].expand(-1, 400, -1))
    r = boxes[:, 4:5]
    d = pts - boxes[:, None, :2]
    u = d[..., 0] * torch.cos(r) + d[..., 1] * torch.sin(r)  # coordinates along the box's axes
    v = -d[..., 0] * torch.sin(r) + d[..., 1] * torch.cos(r)
    inside = (u.abs() <= boxes[:, None, 2] / 2) & (v.abs() <= boxes[:, None, 3] / 2)
    margin = torch.minimum((u.abs() - boxes[:, None, 2] / 2).abs(), (v.abs() - boxes[:, None, 3] / 2).abs())
    clear = margin > 1e-9  # points on the boundary within rounding may go either way
    assert torch.equal(got[clear], inside[clear])
    assert bool(inside.any()) and bool((~inside).any())


@pytest.mark.parametrize("seed", range(3))
def test_rotated_rule_equals_the_dense_rule(seed):
    scores, pd, labels, gt, mask, pts = scene(seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    bsz, m, a = gt.shape[0], gt.shape[1], pts.shape[0]
    rb = torch.cat((F.dist_to_rbox(torch.zeros(bsz, m, 4, dtype=D), torch.zeros(bsz, m, 1, dtype=D),
                                   anchor_points=(gt[..., :2] + gt[..., 2:]) / 2)[..., :2],
                    gt[..., 2:] - gt[..., :2], torch.rand(bsz, m, 1, generator=g, dtype=D) * 1.5), -1) * mask[..., None]
    prb = torch.cat(((pd[..., :2] + pd[..., 2:]) / 2, pd[..., 2:] - pd[..., :2], torch.rand(bsz, a, 1, generator=g, dtype=D) * 1.5), -1)
    asn = RotatedTaskAlignedAssigner(10, 3)
    wide = asn.widened(rb.view(-1, 5)).view(bsz, m, 5)
    inside = points_in_rboxes(pts[None, None].expand(bsz, m, a, 2), wide[:, :, None].expand(bsz, m, a, 5))
    fg, idx, norm = dense_rule(scores, prb, labels, rb, mask, inside,
                               lambda b, gg, an: F.probiou(rb[b, gg], prb[b, an]).clamp(min=0), 10, 10)
    asg = asn.assign(scores, prb, labels, rb, mask, LEVELS)
    assert torch.equal(asg.fg_mask, fg) and bool(fg.any())
    assert torch.equal(asg.target_gt_idx[fg], idx[fg])
    torch.testing.assert_close(asg.target_scores.sum(-1), torch.where(fg, norm, 0.0), rtol=1e-12, atol=1e-15)


def test_pose_level_gate():
    """A box is a candidate on the levels whose stride s has 2 s <= sqrt(w h) <= 12 s (the finest
    level open below, the coarsest above); a box the gate would leave without any keeps them all."""
    strides = torch.cat([torch.full((h * w,), s, dtype=D) for h, w, s in LEVELS])
    asn = PoseTaskAlignedAssigner(10, 1, sigmas=torch.full((2,), 0.1))
    boxes = torch.tensor([[2.0, 2.0, 62.0, 62.0], [20.0, 20.0, 30.0, 30.0]], dtype=D)  # sides 60 and 10
    img = torch.zeros(2, dtype=torch.long)
    box, anchor = asn.candidates(boxes, img, LEVELS)
    assert set(strides[anchor[box == 0]].tolist()) == {8.0, 16.0}  # 60 < 2 * 32
    assert set(strides[anchor[box == 1]].tolist()) == {8.0}  # 10 < 2 * 16; 8 is the finest
    # (1, 1.5) leaves side 14 on no level (> 1.5 * 8, < 1 * 16, < 1 * 32): all its candidates stay
    narrow = PoseTaskAlignedAssigner(10, 1, sigmas=torch.full((2,), 0.1), level_range=(1.0, 1.5))
    b14 = torch.tensor([[10.0, 10.0, 24.0, 24.0]], dtype=D)
    got = narrow.candidates(b14, img[:1], LEVELS)
    ungated = BoxTaskAlignedAssigner(10, 1).candidates(b14, img[:1], LEVELS)
    assert torch.equal(got[1], ungated[1]) and got[1].numel() > 0
