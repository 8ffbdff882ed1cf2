"""YOLOv8OBBLoss (and its end-to-end form) against ultralytics' v8OBBLoss / E2ELoss(v8OBBLoss):
loss vector, items, gradients and the rotated assignment; bad input, properties, decoding.

Reference data: tests/data/ultralytics_tasks (obb01, obb02), whose manifest's SOURCE line reads:
"ultralytics 8.4.190, files ultralytics/utils/loss.py (v8DetectionLoss, BboxLoss, DFLoss,
E2EDetectLoss, E2ELoss, v8OBBLoss, RotatedBboxLoss, v8PoseLoss, PoseLoss26, KeypointLoss, RLELoss,
v8SegmentationLoss, SegmentLoss26, BCEDiceLoss), utils/tal.py (TaskAlignedAssigner,
RotatedTaskAlignedAssigner, PoseTaskAlignedAssigner, SegTaskAlignedAssigner, make_anchors),
utils/metrics.py (bbox_iou, probiou), nn/tasks.py (init_criterion), nn/modules/head.py and
nn/modules/block.py (heads, RealNVP), run unmodified on CPU with torch 2.14.1+cu130,
torch.set_default_dtype(torch.float64) (float32 for the Segment26 cases)".
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detloss.losses.tasks import end_to_end
from detloss.losses.e2e import EndToEndLoss
from detloss.losses.obb import HEAD_ANGLE_RANGE, YOLOv8OBBLoss
from reference_cases import (
    assert_rel_close, case_names, detect_maps, level_maps, load_case, manifest_entry, schedule_points, target_rows,
    task_batch, task_preds,
)

FOLDER = "ultralytics_tasks"
OBB = case_names(FOLDER, "obb*.npz")


def native(cfg):
    m = cfg["model"]
    head, args = m["head"], m["args"]
    kw = dict(box=args["box"], cls=args["cls"], dfl=args["dfl"], angle=args["angle"],
              angle_range=None if head["type"] == "OBB26" else HEAD_ANGLE_RANGE)
    if "one2one_cv2" in head:
        return end_to_end(YOLOv8OBBLoss, head["nc"], head["stride"], head["reg_max"], epochs=args["epochs"], **kw)
    return YOLOv8OBBLoss(head["nc"], head["stride"], head["reg_max"], **kw)


def outputs(branch):
    return detect_maps(branch), level_maps(branch["angle"], branch["feats"])


def call(loss, preds, targets, method="__call__"):
    if isinstance(loss, EndToEndLoss):
        return getattr(loss, method)(outputs(preds["one2many"]), outputs(preds["one2one"]), targets)
    return getattr(loss, method)(*outputs(preds), targets)


@pytest.mark.parametrize("name", OBB)
def test_matches_ultralytics(name):
    arrays, cfg = load_case(FOLDER, name)
    tol = cfg["tolerance"]
    loss = native(cfg)
    targets = target_rows(task_batch(arrays))
    for k, point in zip(schedule_points(cfg), cfg["schedule"]):
        while isinstance(loss, EndToEndLoss) and loss.updates < k:
            loss.update()
        if point["o2m"] is not None:
            assert (loss.o2m, loss.o2o) == (point["o2m"], point["o2o"])
        preds, leaves = task_preds(arrays, cfg)
        out = call(loss, preds, targets)
        assert [f"{c}_loss" for c in out.components] == cfg["item_names"]
        assert_rel_close(torch.stack(list(out.terms.values())), arrays[f"loss.u{k}"], tol, f"loss.u{k}")
        assert_rel_close(torch.stack(list(out.components.values())), arrays[f"items.u{k}"], tol, f"items.u{k}")
        if k in cfg["grad_points"]:
            grads = torch.autograd.grad(out.total, list(leaves.values()))
            for path, g in zip(leaves, grads):
                assert g.dtype == torch.float64
                assert_rel_close(g, arrays[f"grad.u{k}.{path[len('pred.'):]}"], tol, path)


def kept_rows(targets, image_hw, min_side=2.0):
    h, w = image_hw
    return ((targets[:, 4] * w >= min_side) & (targets[:, 5] * h >= min_side)).nonzero().squeeze(1)


@pytest.mark.parametrize("name", OBB)
def test_assignment_matches_ultralytics(name):
    arrays, cfg = load_case(FOLDER, name)
    loss = native(cfg)
    preds, _ = task_preds(arrays, cfg)
    targets = target_rows(task_batch(arrays))
    asg = call(loss, preds, targets, "assign")
    pairs = [("one2many", asg.one2many), ("one2one", asg.one2one)] if isinstance(loss, EndToEndLoss) else [("main", asg)]
    entry = manifest_entry(FOLDER, name)
    kept = kept_rows(targets, cfg["imgsz"])
    assert len(kept) == entry["n_targets"] - entry["n_dropped_under_2px"]
    for branch, a in pairs:
        fg = arrays[f"assign.{branch}.fg_mask"]
        assert torch.equal(a.foreground(), fg)
        assert a.num_pos == entry["assignment"][branch]["num_fg"]
        # the reference indexes the kept targets of each image; ours are rows of targets
        img = targets[kept, 0].long()
        slot = torch.stack([(img[:i] == img[i]).sum() for i in range(len(img))]) if len(img) else img
        row_of = {(int(b), int(s)): int(r) for b, s, r in zip(img, slot, kept)}
        expected = [row_of[(int(b), int(arrays[f"assign.{branch}.target_gt_idx"][b, p]))] for b, p in zip(a.batch_index, a.pred_index)]
        assert a.target_index.tolist() == expected
        torch.testing.assert_close(a.target_scores, arrays[f"assign.{branch}.target_scores"], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------- synthetic
def synthetic(bsz=2, nc=3, reg_max=16, n=6, seed=0, levels=((8, 8), (4, 4), (2, 2)), dtype=torch.float64, angle_range=HEAD_ANGLE_RANGE):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(bsz, 4 * reg_max + nc, h, w, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True) for h, w in levels]
    lo, hi = angle_range if angle_range is not None else (-3.0, 3.0)
    angles = [(lo + (hi - lo) * torch.rand(bsz, 1, h, w, generator=g, dtype=torch.float64)).to(dtype).requires_grad_(True) for h, w in levels]
    img = torch.randint(0, bsz, (n, 1), generator=g).to(torch.float64)
    cls = torch.randint(0, nc, (n, 1), generator=g).to(torch.float64)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.3 + 0.05
    ang = torch.rand(n, 1, generator=g, dtype=torch.float64) * (math.pi / 2)
    return feats, angles, torch.cat((img, cls, xy, wh, ang), 1)


def test_no_targets_and_all_dropped():
    loss = YOLOv8OBBLoss(3)
    feats, angles, targets = synthetic()
    for t in (targets[:0], torch.cat((targets[:, :4], torch.full((6, 2), 1e-3, dtype=torch.float64), targets[:, 6:]), 1)):
        out = loss(feats, angles, t)
        assert out.stats["num_pos"] == 0 and float(out.components["box"]) == 0.0 and float(out.components["angle"]) == 0.0
        assert torch.isfinite(out.total)
        out.total.backward()
    assert out.stats["dropped_targets"] == 6


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       scale=st.sampled_from([1.0, 30.0, 1e3]), seed=st.integers(0, 1000), reg_max=st.sampled_from([1, 16]))
def test_properties(dtype, scale, seed, reg_max):
    ar = None if reg_max == 1 else HEAD_ANGLE_RANGE
    feats, angles, targets = synthetic(reg_max=reg_max, seed=seed, dtype=dtype, angle_range=ar)
    with torch.no_grad():
        for f in feats:
            f.mul_(scale)
    loss = YOLOv8OBBLoss(3, reg_max=reg_max, angle_range=ar)
    out = loss(feats, angles, targets)
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.total.dtype == want and torch.isfinite(out.total)
    grads = torch.autograd.grad(out.total, feats + angles)
    for g, x in zip(grads, feats + angles):
        assert g.dtype == dtype and not torch.isnan(g).any()


def test_decode():
    loss = YOLOv8OBBLoss(3)
    feats, angles, _ = synthetic()
    dec = loss.decode(feats, angles)
    assert dec.boxes.shape == (2, 84, 5) and dec.scores.shape == (2, 84, 3)
    torch.testing.assert_close(dec.boxes[..., 4], torch.cat([a.detach().flatten(1) for a in angles], 1))
    assert bool((dec.boxes[..., 2:4] >= 0).all())


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input():
    loss = YOLOv8OBBLoss(3)
    feats, angles, targets = synthetic()
    with pytest.raises(ValueError, match=r"feats\[0\]: expected shape \[2, 68 \(= 4 \* reg_max 16 \+ nc 4\), H, W\], got \(2, 67, 8, 8\)"):
        YOLOv8OBBLoss(4)(feats, angles, targets)
    with pytest.raises(ValueError, match=r"feats\[0\]: expected shape \[2, 35 \(= 4 \* reg_max 8"):
        YOLOv8OBBLoss(3, reg_max=8)(feats, angles, targets)
    with pytest.raises(ValueError, match=r"angles\[1\]: expected shape \(2, 1, 4, 4\) \(one angle channel\), got \(2, 2, 4, 4\)"):
        loss(feats, [angles[0], angles[1].repeat(1, 2, 1, 1), angles[2]], targets)
    with pytest.raises(ValueError, match=r"angles: expected 3 levels"):
        loss(feats, angles[:2], targets)
    bad = [a.detach() + 3.0 for a in angles]
    with pytest.raises(ValueError, match=r"angles: expected the head.s angles in \[-0.785398, 2.35619\] \(angle_range\)"):
        loss(feats, bad, targets)
    deg = targets.clone()
    deg[0, 6] = 45.0
    with pytest.raises(ValueError, match=r"targets: expected an angle in radians in \[-pi, pi\] in column 6, got 45.0 in row 0"):
        loss(feats, angles, deg)
    with pytest.raises(ValueError, match=r"targets: expected shape \[N, 7\] \(image, class, cx, cy, w, h, angle\), got \(6, 6\)"):
        loss(feats, angles, targets[:, :6])
    cls = targets.clone()
    cls[1, 1] = 5
    with pytest.raises(ValueError, match="targets: expected class < num_classes = 3, got 5 in row 1"):
        loss(feats, angles, cls)
    with pytest.raises(ValueError, match="angle: expected a finite non-negative gain"):
        YOLOv8OBBLoss(3, angle=-1.0)


# ---------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("reg_max", [1, 4])
def test_gradcheck_for_a_fixed_assignment(reg_max):
    """The whole loss (ProbIoU box term, DFL or L1 along the box axes, classification, angle term)
    is differentiated exactly w.r.t. the box channels, the logits and the angles once the
    assignment is fixed (it is made under no_grad, as ultralytics makes it)."""
    ar = None if reg_max == 1 else HEAD_ANGLE_RANGE
    feats, angles, targets = synthetic(bsz=1, reg_max=reg_max, n=3, seed=2, levels=((4, 4), (2, 2), (1, 1)), angle_range=ar)
    if reg_max == 1:  # ltrb distances in grid units, positive
        with torch.no_grad():
            for f in feats:
                f[:, :4] = f[:, :4].abs() + 0.5
    loss = YOLOv8OBBLoss(3, reg_max=reg_max, angle_range=ar)
    fixed = loss.assign(feats, angles, targets)
    assert fixed.num_pos > 0
    loss.assignment = lambda inputs, prepared: fixed
    n = len(feats)
    assert torch.autograd.gradcheck(lambda *x: loss(list(x[:n]), list(x[n:]), targets).total, tuple(feats + angles),
                                    fast_mode=True)


def test_backward_reads_only_the_positives():
    """The assigner's decoding of every anchor carries no gradient; the positives' boxes are
    decoded again with it (so backward never runs over all anchors), to the same values."""
    feats, angles, targets = synthetic(bsz=2, reg_max=4, n=4, seed=3, levels=((8, 8), (4, 4), (2, 2)), angle_range=HEAD_ANGLE_RANGE)
    feats = [f.requires_grad_(True) for f in feats]
    angles = [a.requires_grad_(True) for a in angles]
    loss = YOLOv8OBBLoss(3, reg_max=4)
    inputs = loss.check(feats, angles, targets)
    prepared = loss.prepare(inputs)
    assert not prepared.pred_bboxes.requires_grad
    assignment = loss.assignment(inputs, prepared)
    assert assignment.num_pos > 0
    out = loss.gather(inputs, prepared, assignment)
    assert out.pos_pred_bboxes.requires_grad
    b, a = assignment.batch_index, assignment.pred_index
    torch.testing.assert_close(out.pos_pred_bboxes.detach(), prepared.pred_bboxes[b, a], rtol=1e-6, atol=1e-6)
