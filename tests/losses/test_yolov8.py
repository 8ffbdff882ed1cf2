"""YOLOv8Loss against ultralytics' v8DetectionLoss: loss, items, gradients; edge cases and bad input.

Reference data: tests/data/ultralytics/, whose manifest's SOURCE line reads: "ultralytics 8.4.190
(torch 2.14.1+cu130), imported unmodified: ultralytics/utils/loss.py v8DetectionLoss
(get_assigned_targets_and_loss), BboxLoss, DFLoss, VarifocalLoss, FocalLoss; ultralytics/utils/tal.py
TaskAlignedAssigner, make_anchors, dist2bbox, bbox2dist; ultralytics/utils/metrics.py bbox_iou. CPU,
float64 (torch.set_default_dtype(float64))." The alt_* arrays come from ultralytics 8.3.253 (same
generator), the release without the small-box widening.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import detloss
from reference_cases import case_names, load_case
from detloss import YOLOv8Loss
from detloss.losses import yolov8 as y8

DATA = Path(__file__).resolve().parents[1] / "data" / "ultralytics"
CASES = case_names("ultralytics")


def load(name):
    return load_case("ultralytics", name)


def build(cfg, **kw):
    h = cfg["hyp"]
    return YOLOv8Loss(
        cfg["nc"], strides=cfg["strides"], reg_max=cfg["reg_max"], box=h["box"], cls=h["cls"], dfl=h["dfl"],
        tal_topk=cfg["tal_topk"], tal_topk2=cfg["tal_topk2"], tal_alpha=cfg["tal_alpha"], tal_beta=cfg["tal_beta"], **kw
    )


def rows(d):
    return torch.cat((d["batch_idx"][:, None], d["cls"], d["bboxes"]), 1)


def run(loss_fn, d, prefix=""):
    feats = [d[f"feat{i}"].clone().requires_grad_(True) for i in range(3)]
    out = loss_fn(feats, rows(d))
    grads = torch.autograd.grad(out.total, feats)
    return out, grads


def close(actual, expected, rtol=1e-6):
    """Relative to the largest magnitude of the expected array (so that near-zero entries of a
    gradient do not demand more than the float64 reference itself carries)."""
    scale = expected.abs().max().clamp(min=1e-300)
    assert float((actual - expected).abs().max() / scale) <= rtol


@pytest.mark.parametrize("dense", [False, True], ids=["candidates", "dense"])
@pytest.mark.parametrize("name", CASES)
def test_matches_v8detectionloss(name, dense):
    d, cfg = load(name)
    out, grads = run(build(cfg, dense_assigner=dense), d)
    items = torch.stack([out.components[k] for k in ("box", "cls", "dfl")])
    torch.testing.assert_close(items, d["loss_items"], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(items * cfg["bs"], d["loss"], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(out.total, d["loss_sum"], rtol=1e-6, atol=0)
    for i, g in enumerate(grads):
        assert g.dtype == torch.float64
        close(g, d[f"grad_feat{i}"])
    assert out.stats["target_scores_sum"] == pytest.approx(float(d["target_scores_sum"]), rel=1e-9)
    ref_pos = d["fg_mask"] & ~d["tie_dependent"]
    assert out.stats["num_pos"] >= int(ref_pos.sum())  # tie anchors aside, the same positives
    assert out.stats["num_pos"] <= int(d["fg_mask"].sum())


@pytest.mark.parametrize("name", [c for c in CASES if c not in ("c01_bs1_nc1_one_target.npz", "c04_no_targets.npz", "c06_overlapping_gts.npz", "c12_topk7_topk2_1.npz")])
def test_without_widening_matches_ultralytics_83(name):
    d, cfg = load(name)
    assert "alt_loss" in d
    out, grads = run(build(cfg, enlarge_small_boxes=False), d)
    items = torch.stack([out.components[k] for k in ("box", "cls", "dfl")])
    torch.testing.assert_close(items, d["alt_loss_items"], rtol=1e-6, atol=1e-12)
    for i, g in enumerate(grads):
        close(g, d[f"alt_grad_feat{i}"])


def small_problem(seed=0, bs=2, nc=3, reg_max=4, hw=(64, 64), n=5, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    no = 4 * reg_max + nc
    feats = [
        (torch.randn(bs, no, hw[0] // s, hw[1] // s, generator=g, dtype=torch.float64) * scale).to(dtype)
        for s in (8, 16, 32)
    ]
    img = torch.randint(0, bs, (n,), generator=g).double()
    cls = torch.randint(0, nc, (n,), generator=g).double()
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5 + 0.05
    c = wh / 2 + torch.rand(n, 2, generator=g, dtype=torch.float64) * (1 - wh)
    return feats, torch.cat((img[:, None], cls[:, None], c, wh), 1)


def test_gradcheck_float64():
    """Gradients of the class and DFL terms are exact for a fixed assignment. (TAL's soft targets are
    computed without gradient, and CIoU's aspect weight is held constant as in the reference, so the
    total is not differentiated exactly on purpose; those gradients are checked against the reference.)"""
    feats, targets = small_problem(reg_max=4, hw=(32, 32), n=3, bs=1, nc=2)
    loss_fn = YOLOv8Loss(2, reg_max=4, box=0.0)
    captured = []
    assign = loss_fn.assigner.assign
    loss_fn.assigner.assign = lambda *a: captured[0] if captured else captured.append(assign(*a)) or captured[0]
    assert loss_fn(feats, targets).stats["num_pos"] > 0
    feats = [f.requires_grad_(True) for f in feats]
    assert torch.autograd.gradcheck(lambda *f: loss_fn(list(f), targets).total, feats, fast_mode=True)


def test_no_targets_and_empty_images():
    feats, targets = small_problem(n=0)
    out = YOLOv8Loss(3, reg_max=4)([f.requires_grad_(True) for f in feats], targets)
    assert out.components["box"] == 0 and out.components["dfl"] == 0 and out.stats["num_pos"] == 0
    out.total.backward()
    # with no positives the class loss is plain BCE against 0 summed over everything (normalizer 1)
    logits = torch.cat([f.detach().reshape(2, 19, -1) for f in feats], 2)[:, 16:]
    expected = torch.nn.functional.softplus(logits).sum() * 0.5
    torch.testing.assert_close(out.components["cls"], expected, rtol=1e-12, atol=0)
    # targets only in image 1 of 3: image 0 and 2 still get the background class loss
    feats, targets = small_problem(bs=3, n=4)
    targets[:, 0] = 1
    out = YOLOv8Loss(3, reg_max=4)(feats, targets)
    assert out.stats["num_targets"] == 4 and out.stats["num_pos"] > 0


def test_unsorted_rows_give_the_same_loss():
    feats, targets = small_problem(n=8)
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(1))
    a = YOLOv8Loss(3, reg_max=4)(feats, targets)
    b = YOLOv8Loss(3, reg_max=4)(feats, targets[perm])
    torch.testing.assert_close(a.total, b.total, rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    feats, targets = small_problem(n=6)
    ref = YOLOv8Loss(3, reg_max=4)([f.float() for f in feats], targets)
    half = [f.to(dtype).requires_grad_(True) for f in feats]
    out = YOLOv8Loss(3, reg_max=4)(half, targets)
    assert out.total.dtype == torch.float32
    out.total.backward()
    for f in half:
        assert f.grad.dtype == dtype and bool(torch.isfinite(f.grad).all())
    torch.testing.assert_close(out.total, ref.total, rtol=0.05, atol=0)


def test_extreme_logits_stay_finite():
    feats, targets = small_problem(n=6, scale=1e4, dtype=torch.float32)
    feats = [f.requires_grad_(True) for f in feats]
    out = YOLOv8Loss(3, reg_max=4)(feats, targets)
    out.total.backward()
    assert bool(torch.isfinite(out.total)) and all(bool(torch.isfinite(f.grad).all()) for f in feats)


def test_zero_size_and_overlapping_boxes():
    feats, _ = small_problem(n=0)
    targets = torch.tensor(
        [[0, 0, 0.5, 0.5, 0.0, 0.0], [0, 1, 0.5, 0.5, 0.4, 0.4], [0, 2, 0.5, 0.5, 0.4, 0.4], [1, 0, 0.2, 0.3, 1.0, 0.0]],
        dtype=torch.float64,
    )
    feats = [f.requires_grad_(True) for f in feats]
    out = YOLOv8Loss(3, reg_max=4)(feats, targets)
    out.total.backward()
    assert bool(torch.isfinite(out.total)) and all(bool(torch.isfinite(f.grad).all()) for f in feats)
    assert out.stats["matched_targets"] <= out.stats["num_targets"] == 4


def test_reduce_across_ranks(monkeypatch):
    """With the option on, the normalizer is the mean over ranks of the target-score sums."""
    feats, targets = small_problem(n=6)
    local = YOLOv8Loss(3, reg_max=4)(feats, targets)
    s = local.stats["target_scores_sum"]
    assert YOLOv8Loss(3, reg_max=4, reduce_across_ranks=True)(feats, targets).total == local.total  # 1 process
    other = 3.0 * s + 4.0  # pretend a second rank with this sum
    monkeypatch.setattr(detloss.distributed, "reduce_sum", lambda t: t + other)
    monkeypatch.setattr(detloss.distributed, "world_size", lambda: 2)
    out = YOLOv8Loss(3, reg_max=4, reduce_across_ranks=True)(feats, targets)
    norm = (s + other) / 2
    assert out.stats["target_scores_sum"] == pytest.approx(norm)
    for k in ("box", "cls", "dfl"):
        torch.testing.assert_close(out.components[k], local.components[k] * s / norm, rtol=1e-10, atol=0)


def test_stats_and_output():
    d, cfg = load("c07_crowded.npz")
    out, _ = run(build(cfg), d)
    st = out.stats
    assert st["num_targets"] == 60 and 0 < st["matched_targets"] <= 60
    assert 0 < st["iou_mean"] <= 1 and st["ciou_mean"] <= st["iou_mean"]
    assert set(out.components) == {"box", "cls", "dfl"}
    assert not any(v.requires_grad for v in out.components.values())
    assert detloss.YOLOv8Loss is YOLOv8Loss


def test_helpers_match_reference_blocks():
    """make_anchors / bbox decoding against ultralytics' blocks (blocks.npz of the same generator)."""
    b = np.load(DATA / "blocks.npz")
    h, w = (int(v) for v in b["anchors_img_hw"])
    levels = [(h // s, w // s, float(s)) for s in (8, 16, 32)]
    pts, strides = y8.make_anchors(levels, torch.float64, torch.device("cpu"))
    assert torch.equal(pts, torch.from_numpy(b["anchors_points"]))
    assert torch.equal(strides, torch.from_numpy(b["anchors_stride"]))
    dist = torch.from_numpy(b["decode_pred_dist"]).requires_grad_(True)
    boxes = y8.decode_distances(dist, torch.from_numpy(b["anchors_points"]))
    torch.testing.assert_close(boxes, torch.from_numpy(b["decode_xyxy"]), rtol=1e-9, atol=1e-12)
    (g,) = torch.autograd.grad(boxes.sum(), dist)
    torch.testing.assert_close(g, torch.from_numpy(b["decode_grad"]), rtol=1e-9, atol=1e-12)


def test_bad_inputs():
    feats, targets = small_problem(n=3)
    loss_fn = YOLOv8Loss(3, reg_max=4)
    with pytest.raises(ValueError, match="feats: expected 3 levels"):
        loss_fn(feats[:2], targets)
    with pytest.raises(TypeError, match="feats"):
        loss_fn(feats[0], targets)
    with pytest.raises(ValueError, match=r"feats\[1\]: expected shape \[2, 19"):
        loss_fn([feats[0], feats[1][:, :5], feats[2]], targets)
    with pytest.raises(ValueError, match=r"feats\[2\]: expected finite"):
        loss_fn([feats[0], feats[1], feats[2] * float("inf")], targets)
    with pytest.raises(TypeError, match=r"feats\[1\]: expected dtype"):
        loss_fn([feats[0], feats[1].float(), feats[2]], targets)
    bad = targets.clone()
    bad[2, 1] = 3
    with pytest.raises(ValueError, match="targets: expected class < num_classes = 3, got 3 in row 2"):
        loss_fn(feats, bad)
    bad = targets.clone()
    bad[1, 0] = 2
    with pytest.raises(ValueError, match="targets: .*image index.* in row 1"):
        loss_fn(feats, bad)
    with pytest.raises(ValueError, match="targets: expected shape"):
        loss_fn(feats, targets[:, :5])
    with pytest.raises(ValueError, match="reg_max"):
        YOLOv8Loss(3, reg_max=1)
