"""YOLOv8PoseLoss and YOLO26PoseLoss (with the RealNVP flow, and end to end) against ultralytics'
v8PoseLoss / PoseLoss26 / E2ELoss(PoseLoss26): loss vector, items, gradients (the flow's
parameters included) and the assignment; bad input and properties.

Reference data: tests/data/ultralytics_tasks (pose01..pose04), whose manifest's SOURCE line reads:
"ultralytics 8.4.190, files ultralytics/utils/loss.py (v8DetectionLoss, BboxLoss, DFLoss,
E2EDetectLoss, E2ELoss, v8OBBLoss, RotatedBboxLoss, v8PoseLoss, PoseLoss26, KeypointLoss, RLELoss,
v8SegmentationLoss, SegmentLoss26, BCEDiceLoss), utils/tal.py (TaskAlignedAssigner,
RotatedTaskAlignedAssigner, PoseTaskAlignedAssigner, SegTaskAlignedAssigner, make_anchors),
utils/metrics.py (bbox_iou, probiou), nn/tasks.py (init_criterion), nn/modules/head.py and
nn/modules/block.py (heads, RealNVP), run unmodified on CPU with torch 2.14.1+cu130,
torch.set_default_dtype(torch.float64) (float32 for the Segment26 cases)".
The flow model is detloss.nn.RealNVP loaded with the stored state (``flow.*``).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import detloss.nn as dnn
from detloss.losses.tasks import end_to_end
from detloss.losses.e2e import EndToEndLoss
from detloss.losses.pose import YOLO26PoseLoss, YOLOv8PoseLoss
from reference_cases import (
    assert_rel_close, case_names, detect_maps, flow_state, level_maps, load_case, manifest_entry, schedule_points,
    target_rows, task_batch, task_preds,
)

FOLDER = "ultralytics_tasks"
POSE = case_names(FOLDER, "pose*.npz")


def flow_of(arrays):
    state = flow_state(arrays)
    if not state:
        return None
    flow = dnn.RealNVP().double()
    flow.load_state_dict(state)
    return flow


def native(cfg, arrays):
    m = cfg["model"]
    head, args = m["head"], m["args"]
    kw = dict(box=args["box"], cls=args["cls"], dfl=args["dfl"], pose=args["pose"], kobj=args["kobj"],
              kpt_shape=tuple(head["kpt_shape"]))
    if m.get("kpt_oks_sigmas") is not None:
        kw["sigmas"] = torch.tensor(m["kpt_oks_sigmas"], dtype=torch.float32)
    cls = YOLOv8PoseLoss
    flow = None
    if head["type"] == "Pose26":
        cls = YOLO26PoseLoss
        flow = flow_of(arrays)
        if flow is not None:
            kw.update(flow_model=flow, rle=args["rle"])
    if "one2one_cv2" in head:
        return end_to_end(cls, head["nc"], head["stride"], head["reg_max"], epochs=args["epochs"], **kw), flow
    return cls(head["nc"], head["stride"], head["reg_max"], **kw), flow


def head_outputs(branch, yolo26):
    """One head's outputs as the loss takes them: (feats, kpts[, kpts_sigma])."""
    out = (detect_maps(branch), level_maps(branch["kpts"], branch["feats"]))
    return out + (level_maps(branch["kpts_sigma"], branch["feats"]),) if yolo26 else out


def call(loss, cfg, preds, batch, method="__call__"):
    yolo26 = cfg["model"]["head"]["type"] == "Pose26"
    rows, kp = target_rows(batch), batch["keypoints"]
    if isinstance(loss, EndToEndLoss):
        return getattr(loss, method)(head_outputs(preds["one2many"], yolo26), head_outputs(preds["one2one"], yolo26), rows, kp)
    return getattr(loss, method)(*head_outputs(preds, yolo26), rows, kp)


@pytest.mark.parametrize("name", [n for n in POSE if "E2E" not in n])
def test_matches_ultralytics(name):
    arrays, cfg = load_case(FOLDER, name)
    tol = cfg["tolerance"]
    loss, flow = native(cfg, arrays)
    preds, leaves = task_preds(arrays, cfg)
    out = call(loss, cfg, preds, task_batch(arrays))
    assert [f"{c}_loss" for c in out.components] == cfg["item_names"]
    assert_rel_close(torch.stack(list(out.terms.values())), arrays["loss.u0"], tol, "loss.u0")
    assert_rel_close(torch.stack(list(out.components.values())), arrays["items.u0"], tol, "items.u0")
    params = list(flow.named_parameters()) if flow is not None else []
    grads = torch.autograd.grad(out.total, list(leaves.values()) + [p for _, p in params], allow_unused=True)
    for path, g in zip(leaves, grads):
        expected = arrays[f"grad.u0.{path[len('pred.'):]}"]
        assert_rel_close(torch.zeros_like(expected) if g is None else g, expected, tol, path)
    for (pname, _), g in zip(params, grads[len(leaves):]):
        assert_rel_close(g, arrays[f"flowgrad.u0.{pname}"], tol, pname)


@pytest.mark.parametrize("name", [n for n in POSE if "E2E" in n])
def test_end_to_end_matches_ultralytics(name):
    arrays, cfg = load_case(FOLDER, name)
    tol = cfg["tolerance"]
    loss, flow = native(cfg, arrays)
    batch = task_batch(arrays)
    for k, point in zip(schedule_points(cfg), cfg["schedule"]):
        while loss.updates < k:
            loss.update()
        assert (loss.o2m, loss.o2o) == (point["o2m"], point["o2o"])
        preds, leaves = task_preds(arrays, cfg)
        out = call(loss, cfg, preds, batch)
        assert [f"{c}_loss" for c in out.components] == cfg["item_names"]
        assert_rel_close(torch.stack(list(out.terms.values())), arrays[f"loss.u{k}"], tol, f"loss.u{k}")
        assert_rel_close(torch.stack(list(out.components.values())), arrays[f"items.u{k}"], tol, f"items.u{k}")
        if k in cfg["grad_points"]:
            params = list(flow.named_parameters())
            grads = torch.autograd.grad(out.total, list(leaves.values()) + [p for _, p in params])
            for path, g in zip(leaves, grads):
                assert_rel_close(g, arrays[f"grad.u{k}.{path[len('pred.'):]}"], tol, path)
            if k == 0:  # flowgrad is recorded at the first schedule point
                for (pname, _), g in zip(params, grads[len(leaves):]):
                    assert_rel_close(g, arrays[f"flowgrad.u0.{pname}"], tol, pname)


@pytest.mark.parametrize("name", POSE)
def test_assignment_matches_ultralytics(name):
    arrays, cfg = load_case(FOLDER, name)
    entry = manifest_entry(FOLDER, name)
    loss, _ = native(cfg, arrays)
    preds, _ = task_preds(arrays, cfg)
    batch = task_batch(arrays)
    asg = call(loss, cfg, preds, batch, "assign")
    pairs = [("one2many", asg.one2many), ("one2one", asg.one2one)] if isinstance(loss, EndToEndLoss) else [("main", asg)]
    img = target_rows(batch)[:, 0].long()
    first = torch.searchsorted(img, torch.arange(int(img.max()) + 2))
    for branch, a in pairs:
        assert torch.equal(a.foreground(), arrays[f"assign.{branch}.fg_mask"])
        assert a.num_pos == entry["assignment"][branch]["num_fg"]
        within = a.target_index - first[a.batch_index]
        assert torch.equal(within, arrays[f"assign.{branch}.target_gt_idx"][a.batch_index, a.pred_index])
        torch.testing.assert_close(a.target_scores, arrays[f"assign.{branch}.target_scores"], rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------------------------- synthetic
def synthetic(bsz=2, nc=1, reg_max=16, k=4, d=3, n=5, seed=0, levels=((8, 8), (4, 4), (2, 2)), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    leaf = lambda c, h, w: torch.randn(bsz, c, h, w, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    feats = [leaf(4 * reg_max + nc, h, w) for h, w in levels]
    kpts = [leaf(k * d, h, w) for h, w in levels]
    sig = [leaf(2 * k, h, w) for h, w in levels]
    img = torch.randint(0, bsz, (n, 1), generator=g).to(torch.float64)
    cls = torch.randint(0, nc, (n, 1), generator=g).to(torch.float64)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.3 + 0.1
    rows = torch.cat((img, cls, xy, wh), 1)
    kp = torch.rand(n, k, d, generator=g, dtype=torch.float64)
    if d == 3:
        kp[..., 2] = torch.randint(0, 3, (n, k), generator=g).to(torch.float64)
    return feats, kpts, sig, rows, kp


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       scale=st.sampled_from([1.0, 30.0, 1e3]), seed=st.integers(0, 1000), d=st.sampled_from([2, 3]),
       yolo26=st.booleans(), empty=st.booleans())
def test_properties(dtype, scale, seed, d, yolo26, empty):
    feats, kpts, sig, rows, kp = synthetic(d=d, seed=seed, dtype=dtype, reg_max=16)
    with torch.no_grad():
        for f in feats + kpts + sig:
            f.mul_(scale)
    if empty:
        rows, kp = rows[:0], kp[:0]
    if yolo26:
        flow = dnn.RealNVP()
        loss = YOLO26PoseLoss(1, reg_max=16, kpt_shape=(4, d), flow_model=flow)
        out = loss(feats, kpts, sig, rows, kp)
        leaves = feats + kpts + sig
    else:
        loss = YOLOv8PoseLoss(1, kpt_shape=(4, d))
        out = loss(feats, kpts, rows, kp)
        leaves = feats + kpts
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.total.dtype == want and torch.isfinite(out.total)
    for g, x in zip(torch.autograd.grad(out.total, leaves, allow_unused=True), leaves):
        if g is not None:
            assert g.dtype == dtype and not torch.isnan(g).any()


def test_sigmas_follow_ultralytics_rule():
    assert torch.equal(YOLOv8PoseLoss(1).sigmas, dnn.KeypointLoss().sigmas)
    torch.testing.assert_close(YOLOv8PoseLoss(1, kpt_shape=(5, 2)).sigmas, torch.full((5,), 0.2))
    torch.testing.assert_close(YOLO26PoseLoss(1, kpt_shape=(4, 3), flow_model=dnn.RealNVP()).rle_weights, torch.ones(4))


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input():
    feats, kpts, sig, rows, kp = synthetic()
    loss = YOLOv8PoseLoss(1, kpt_shape=(4, 3))
    with pytest.raises(ValueError, match=r"kpts\[0\]: expected shape \(2, 15, 8, 8\) \(K \* D = 5 \* 3 keypoint channels\), got \(2, 12, 8, 8\)"):
        YOLOv8PoseLoss(1, kpt_shape=(5, 3))(feats, kpts, rows, torch.rand(5, 5, 3))
    with pytest.raises(ValueError, match=r"keypoints: expected shape \[5, 4, 2 or 3\] \(one row per target, x, y\[, visibility\]\), got \(5, 17, 3\)"):
        loss(feats, kpts, rows, torch.rand(5, 17, 3))
    with pytest.raises(ValueError, match=r"keypoints: expected shape \[5, 4, 2 or 3\].*got \(4, 4, 3\)"):
        loss(feats, kpts, rows, kp[:4])
    with pytest.raises(ValueError, match=r"keypoints: expected shape \[5, 4, 2 or 3\].*got \(5, 4, 4\)"):
        loss(feats, kpts, rows, torch.rand(5, 4, 4))
    nan = kp.clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="keypoints: expected finite values"):
        loss(feats, kpts, rows, nan)
    with pytest.raises(ValueError, match=r"feats\[0\]: expected shape \[2, 66 \(= 4 \* reg_max 16 \+ nc 2\)"):
        YOLOv8PoseLoss(2, kpt_shape=(4, 3))(feats, kpts, rows, kp)
    with pytest.raises(ValueError, match=r"kpt_shape: expected \(keypoints >= 1, 2 or 3\), got \(4, 4\)"):
        YOLOv8PoseLoss(1, kpt_shape=(4, 4))
    with pytest.raises(ValueError, match=r"sigmas: expected 4 positive values \(one per keypoint\)"):
        YOLOv8PoseLoss(1, kpt_shape=(4, 3), sigmas=torch.ones(17))
    flow_loss = YOLO26PoseLoss(1, reg_max=16, kpt_shape=(4, 3), flow_model=dnn.RealNVP())
    with pytest.raises(ValueError, match=r"kpts_sigma: expected the head's sigma logits per level \[B, 2 K, H, W\]"):
        flow_loss(feats, kpts, None, rows, kp)
    with pytest.raises(ValueError, match=r"kpts_sigma\[2\]: expected shape \(2, 8, 2, 2\) \(2 \* K = 2 \* 4 sigma channels\)"):
        flow_loss(feats, kpts, [sig[0], sig[1], sig[2][:, :4]], rows, kp)
    with pytest.raises(TypeError, match="flow_model: expected a module with log_prob"):
        YOLO26PoseLoss(1, flow_model=torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("yolo26", [False, True], ids=["v8", "yolo26_rle"])
def test_gradcheck_for_a_fixed_assignment(yolo26):
    """OKS keypoint term, keypoint-visibility BCE, classification, DFL and (YOLO26) the RLE term
    through the flow are differentiated exactly w.r.t. the head outputs and the flow's parameters
    for a fixed assignment (box gain 0: the CIoU's aspect weight is held constant as in ultralytics,
    checked against the reference above)."""
    feats, kpts, sig, rows, kp = synthetic(bsz=1, reg_max=4, k=3, n=3, seed=1, levels=((4, 4), (2, 2), (1, 1)))
    n = len(feats)
    if not yolo26:
        loss = YOLOv8PoseLoss(1, reg_max=4, kpt_shape=(3, 3), box=0.0)
        fixed = loss.assign(feats, kpts, rows, kp)
        assert fixed.num_pos > 0
        loss.assignment = lambda inputs, prepared: fixed
        assert float(loss(feats, kpts, rows, kp).components["pose"]) > 0
        assert torch.autograd.gradcheck(lambda *x: loss(list(x[:n]), list(x[n:]), rows, kp).total, tuple(feats + kpts),
                                        fast_mode=True)
        return
    loss = YOLO26PoseLoss(1, reg_max=4, kpt_shape=(3, 3), box=0.0, flow_model=dnn.RealNVP().double())
    fixed = loss.assign(feats, kpts, sig, rows, kp)
    assert fixed.num_pos > 0
    loss.assignment = lambda inputs, prepared: fixed
    names = [k for k, _ in loss.named_parameters()]
    assert names and all(k.startswith("flow_model.") for k in names)
    params = [p.detach().clone().requires_grad_(True) for _, p in loss.named_parameters()]

    def total(*x):
        state = dict(zip(names, x[3 * n:]))
        heads = (list(x[:n]), list(x[n:2 * n]), list(x[2 * n:3 * n]), rows, kp)
        return torch.func.functional_call(loss, state, heads).total

    out = total(*feats, *kpts, *sig, *params)
    assert float(out.detach()) > 0 and float(loss(feats, kpts, sig, rows, kp).components["rle"]) != 0
    assert torch.autograd.gradcheck(total, tuple(feats + kpts + sig + params), fast_mode=True)
