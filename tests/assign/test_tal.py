"""TaskAlignedAssigner against ultralytics' own outputs, and the candidate path against the dense one.

Reference data: tests/data/ultralytics/, whose manifest's SOURCE line reads: "ultralytics 8.4.190
(torch 2.14.1+cu130), imported unmodified: ultralytics/utils/loss.py v8DetectionLoss
(get_assigned_targets_and_loss), BboxLoss, DFLoss, VarifocalLoss, FocalLoss; ultralytics/utils/tal.py
TaskAlignedAssigner, make_anchors, dist2bbox, bbox2dist; ultralytics/utils/metrics.py bbox_iou. CPU,
float64 (torch.set_default_dtype(float64))."
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import detloss
from reference_cases import case_names, load_case
from detloss.assign.tal import (
    TaskAlignedAssigner,
    _candidate_pairs,
    _infer_levels,
    anchor_grid,
    enlarge_small_boxes,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "ultralytics"
CASES = case_names("ultralytics")


def load(name):
    return load_case("ultralytics", name)


def assigner_inputs(d, cfg):
    bs, rm = cfg["bs"], cfg["reg_max"]
    feats = [d[f"feat{i}"] for i in range(3)]
    logits = torch.cat([f.reshape(bs, f.shape[1], -1) for f in feats], 2)[:, 4 * rm :].permute(0, 2, 1)
    anc = d["anchor_points"] * d["stride_tensor"]
    shapes = [tuple(f.shape[2:]) for f in feats]
    return (
        logits.sigmoid(),
        d["assign_in_pd_bboxes"],
        anc,
        d["assign_in_gt_labels"],
        d["assign_in_gt_bboxes"],
        d["assign_in_mask_gt"],
    ), shapes


def make_assigner(cfg, **kw):
    kw.setdefault("min_side", float(cfg["stride_val"]))
    return TaskAlignedAssigner(
        topk=cfg["tal_topk"], num_classes=cfg["nc"], topk2=cfg["tal_topk2"], alpha=cfg["tal_alpha"],
        beta=cfg["tal_beta"], eps=cfg["tal_eps"], **kw
    )


def test_manifest_lists_every_case():
    manifest = json.loads((DATA / "manifest.json").read_text())
    assert manifest["SOURCE"].startswith("ultralytics 8.4.190")
    assert sorted(c["file"] for c in manifest["cases"]) == CASES


@pytest.mark.parametrize("dense", [False, True], ids=["candidates", "dense"])
@pytest.mark.parametrize("name", CASES)
def test_assigner_matches_reference(name, dense):
    d, cfg = load(name)
    args, shapes = assigner_inputs(d, cfg)
    out = make_assigner(cfg, dense=dense)(*args, feat_shapes=shapes)
    keep = ~d["tie_dependent"]
    assert torch.equal(out.fg_mask[keep], d["fg_mask"][keep])
    assert torch.equal(out.target_gt_idx[keep], d["target_gt_idx"][keep])
    assert torch.equal(out.target_labels[keep], d["target_labels"][keep])
    torch.testing.assert_close(out.target_bboxes[keep], d["target_bboxes"][keep], rtol=1e-9, atol=0)
    # target scores everywhere: tie-dependent anchors have score 0 in the reference either way
    torch.testing.assert_close(out.target_scores, d["target_scores"], rtol=1e-6, atol=1e-15)
    assert out.target_labels.dtype == torch.long and out.fg_mask.dtype == torch.bool
    # the anchors where this implementation and the reference may differ are exactly tie anchors
    differ = out.fg_mask != d["fg_mask"]
    assert not bool((differ & keep).any())


@pytest.mark.parametrize("name", [c for c in CASES if "no_targets" not in c])
def test_candidates_match_reference_mask_in_gts(name):
    """The arithmetic enumeration of anchors inside (widened) boxes equals the reference's mask."""
    d, cfg = load(name)
    shapes = [tuple(d[f"feat{i}"].shape[2:]) for i in range(3)]
    levels = [(h, w, float(s)) for (h, w), s in zip(shapes, cfg["strides"])]
    valid = d["assign_in_mask_gt"][..., 0]
    img, row = valid.nonzero(as_tuple=True)
    boxes = enlarge_small_boxes(d["assign_in_gt_bboxes"][img, row], float(cfg["stride_val"]))
    box, anchor = _candidate_pairs(boxes, levels, cfg["tal_eps"])
    mask = torch.zeros_like(d["mask_in_gts"])
    mask[img[box], row[box], anchor] = True
    assert torch.equal(mask, d["mask_in_gts"] & valid[..., None])


@pytest.mark.parametrize("name", ["c02_bs2_nc3_random.npz", "c05_empty_image_in_batch.npz", "c07_crowded.npz"])
def test_without_widening_matches_83(name):
    """min_side=None is ultralytics 8.3's assignment (the alt_* arrays)."""
    d, cfg = load(name)
    args, shapes = assigner_inputs(d, cfg)
    res = make_assigner(cfg, min_side=None)(*args, feat_shapes=shapes)
    torch.testing.assert_close(res.target_scores, d["alt_target_scores"], rtol=1e-6, atol=1e-15)
    # where the 8.3 run assigned with a non-zero score, the assignment is the same
    sure = d["alt_target_scores"].sum(-1) > 0
    assert torch.equal(res.fg_mask[sure], d["alt_fg_mask"][sure])
    assert torch.equal(res.target_gt_idx[sure], d["alt_target_gt_idx"][sure])


def test_layout_is_recognised_and_other_layouts_fall_back():
    d, cfg = load("c10_nonsquare_64x192.npz")
    args, shapes = assigner_inputs(d, cfg)
    levels = _infer_levels(args[2], cfg["strides"])
    assert [(h, w) for h, w, _ in levels] == shapes
    torch.testing.assert_close(anchor_grid(levels, torch.float64, torch.device("cpu")), args[2], rtol=0, atol=0)
    asg = make_assigner(cfg)
    inferred = asg(*args)  # no feat_shapes: layout inferred
    given_shapes = asg(*args, feat_shapes=shapes)
    for a, b in zip(inferred, given_shapes):
        assert torch.equal(a, b)
    # a permuted anchor order is not a grid layout: computed densely, same result permuted
    perm = torch.randperm(args[2].shape[0], generator=torch.Generator().manual_seed(0))
    assert _infer_levels(args[2][perm], cfg["strides"]) is None
    p_args = (args[0][:, perm], args[1][:, perm], args[2][perm], *args[3:])
    permuted = asg(*p_args)
    keep = ~d["tie_dependent"][:, perm]
    assert torch.equal(permuted.fg_mask[keep], given_shapes.fg_mask[:, perm][keep])
    torch.testing.assert_close(permuted.target_scores, given_shapes.target_scores[:, perm], rtol=1e-12, atol=0)


def random_problem(seed, bs, nc, hw, max_boxes, small=False):
    g = torch.Generator().manual_seed(seed)
    strides = (8.0, 16.0, 32.0)
    h, w = hw
    levels = [(h // int(s), w // int(s), s) for s in strides]
    anc = anchor_grid(levels, torch.float64, torch.device("cpu"))
    n = anc.shape[0]
    scores = torch.rand(bs, n, nc, generator=g, dtype=torch.float64)
    ltrb = torch.rand(bs, n, 4, generator=g, dtype=torch.float64) * 48
    pd = torch.cat((anc - ltrb[..., :2], anc + ltrb[..., 2:]), -1)
    counts = torch.randint(0, max_boxes + 1, (bs,), generator=g)
    m = int(counts.max())
    gt = torch.zeros(bs, m, 4, dtype=torch.float64)
    labels = torch.zeros(bs, m, 1, dtype=torch.float64)
    scale = 12.0 if small else min(h, w) * 0.6
    for b in range(bs):
        k = int(counts[b])
        c = torch.rand(k, 2, generator=g, dtype=torch.float64) * torch.tensor([w, h], dtype=torch.float64)
        s = torch.rand(k, 2, generator=g, dtype=torch.float64) * scale + 1
        gt[b, :k] = torch.cat((c - s / 2, c + s / 2), -1)
        labels[b, :k, 0] = torch.randint(0, nc, (k,), generator=g).double()
    mask = gt.sum(-1, keepdim=True) > 0
    return (scores, pd, anc, labels, gt, mask), [(a, b) for a, b, _ in levels]


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bs=st.integers(1, 3),
    nc=st.integers(1, 4),
    hw=st.sampled_from([(64, 64), (96, 160), (128, 64)]),
    max_boxes=st.integers(0, 25),
    topk=st.integers(1, 12),
    topk2=st.sampled_from([None, 1, 3]),
    small=st.booleans(),
    widen=st.booleans(),
)
def test_candidates_equal_dense(seed, bs, nc, hw, max_boxes, topk, topk2, small, widen):
    args, shapes = random_problem(seed, bs, nc, hw, max_boxes, small)
    kw = dict(topk=topk, num_classes=nc, topk2=topk2, min_side=16.0 if widen else None)
    sparse = TaskAlignedAssigner(**kw)(*args, feat_shapes=shapes)
    dense = TaskAlignedAssigner(dense=True, **kw)(*args, feat_shapes=shapes)
    assert torch.equal(sparse.fg_mask, dense.fg_mask)
    assert torch.equal(sparse.target_gt_idx, dense.target_gt_idx)
    assert torch.equal(sparse.target_labels, dense.target_labels)
    assert torch.equal(sparse.target_bboxes, dense.target_bboxes)
    torch.testing.assert_close(sparse.target_scores, dense.target_scores, rtol=1e-12, atol=0)
    # every positive has exactly one class score, and it is its box's class
    pos_scores = sparse.target_scores[sparse.fg_mask]
    assert bool((pos_scores.gt(0).sum(-1) <= 1).all())
    assert bool((sparse.target_scores[~sparse.fg_mask] == 0).all())


def test_overlapping_boxes_share_no_anchor():
    """Identical boxes of two classes: each anchor goes to one of them (the first, on equal overlap)."""
    args, shapes = random_problem(3, 1, 2, (64, 64), 0)
    scores, pd, anc = args[:3]
    gt = torch.tensor([[[8.0, 8.0, 56.0, 56.0], [8.0, 8.0, 56.0, 56.0]]], dtype=torch.float64)
    labels = torch.tensor([[[0.0], [1.0]]], dtype=torch.float64)
    out = TaskAlignedAssigner(num_classes=2)(scores, pd, anc, labels, gt, feat_shapes=shapes)
    assert int(out.fg_mask.sum()) > 0
    # equal CIoU for both boxes: the first box wins every shared anchor
    assert bool((out.target_gt_idx[out.fg_mask] == 0).all())
    assert bool((out.target_scores[..., 1] == 0).all())


def test_no_boxes_and_all_padding():
    args, shapes = random_problem(1, 2, 3, (64, 64), 0)
    scores, pd, anc = args[:3]
    empty = TaskAlignedAssigner(num_classes=3)(
        scores, pd, anc, torch.zeros(2, 0, 1), torch.zeros(2, 0, 4, dtype=torch.float64), feat_shapes=shapes
    )
    assert not bool(empty.fg_mask.any()) and bool((empty.target_labels == 3).all())
    assert bool((empty.target_scores == 0).all())
    padded = TaskAlignedAssigner(num_classes=3)(
        scores, pd, anc, torch.zeros(2, 4, 1), torch.zeros(2, 4, 4, dtype=torch.float64), feat_shapes=shapes
    )
    assert not bool(padded.fg_mask.any()) and bool((padded.target_gt_idx == 0).all())


def test_half_precision_is_computed_in_float32():
    args, shapes = random_problem(5, 2, 3, (64, 64), 6)
    ref = TaskAlignedAssigner(num_classes=3)(*[a.float() if a.is_floating_point() else a for a in args], feat_shapes=shapes)
    for dt in (torch.float16, torch.bfloat16):
        half = [a.to(dt) if a.is_floating_point() else a for a in args]
        out = TaskAlignedAssigner(num_classes=3)(*half, feat_shapes=shapes)
        assert out.target_scores.dtype == torch.float32
        assert bool(torch.isfinite(out.target_scores).all())
    assert ref.target_scores.dtype == torch.float32


def test_exported_lazily():
    assert detloss.TaskAlignedAssigner is TaskAlignedAssigner


def test_bad_inputs():
    args, shapes = random_problem(2, 1, 3, (64, 64), 3)
    scores, pd, anc, labels, gt, mask = args
    asg = TaskAlignedAssigner(num_classes=3)
    with pytest.raises(ValueError, match="pd_scores"):
        TaskAlignedAssigner(num_classes=4)(*args)
    with pytest.raises(ValueError, match="pd_bboxes"):
        asg(scores, pd[..., :3], anc, labels, gt, mask)
    with pytest.raises(ValueError, match="anc_points"):
        asg(scores, pd, anc[:-1], labels, gt, mask)
    with pytest.raises(ValueError, match="gt_labels.*classes in \\[0, 2\\].*image 0, row 0"):
        asg(scores, pd, anc, labels + 7, gt, mask)
    with pytest.raises(ValueError, match="gt_bboxes: expected finite"):
        asg(scores, pd, anc, labels, gt.clone().fill_(float("nan")), mask)
    with pytest.raises(TypeError, match="pd_scores"):
        asg(scores.long(), pd, anc, labels, gt, mask)
    with pytest.raises(ValueError, match="feat_shapes"):
        asg(*args, feat_shapes=[(8, 8), (4, 4), (1, 1)])
    with pytest.raises(ValueError, match="topk"):
        TaskAlignedAssigner(topk=0)
    with pytest.raises(ValueError, match="min_side"):
        TaskAlignedAssigner(min_side=-1.0)


def test_raw_logits_are_refused_where_probabilities_are_documented():
    args, _ = random_problem(2, 1, 3, (64, 64), 3)
    scores, *rest = args
    logits = torch.logit(scores.clamp(1e-6, 1 - 1e-6))
    assert bool((logits < 0).any())
    with pytest.raises(ValueError, match=r"pd_scores: expected probabilities in \[0, 1\] \(sigmoid of the class logits\)"):
        TaskAlignedAssigner(num_classes=3)(logits, *rest)
    with pytest.raises(ValueError, match=r"pd_scores: expected probabilities in \[0, 1\]"):
        TaskAlignedAssigner(num_classes=3)(scores + 1.0, *rest)
    TaskAlignedAssigner(num_classes=3)(scores.clamp(0, 1), *rest)  # 0 and 1 themselves are probabilities


def test_inverted_boxes_are_named_by_the_assigners_arguments():
    args, _ = random_problem(2, 1, 3, (64, 64), 3)
    scores, pd, anc, labels, gt, mask = args
    asg = TaskAlignedAssigner(num_classes=3)
    bad = gt.clone()
    bad[0, 0] = bad[0, 0, [2, 3, 0, 1]]  # x1 > x2, y1 > y2
    with pytest.raises(ValueError, match=r"gt_bboxes: expected xyxy boxes with x1 <= x2 and y1 <= y2, got .* at index \(0, 0\)"):
        asg(scores, pd, anc, labels, bad, mask)
    # a padding row may hold anything
    masked = mask.clone()
    masked[0, 0] = False
    asg(scores, pd, anc, labels, bad, masked)
    # inverted predicted boxes count with their CIoU, as ultralytics takes them; both paths agree
    flipped = pd[..., [2, 3, 0, 1]].clone()
    a = asg(scores, flipped, anc, labels, gt, mask)
    b = TaskAlignedAssigner(num_classes=3, dense=True)(scores, flipped, anc, labels, gt, mask)
    assert torch.equal(a.fg_mask, b.fg_mask) and torch.equal(a.target_scores, b.target_scores)
