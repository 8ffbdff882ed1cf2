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


@pytest.mark.parametrize("path", ["plain", "fused", "fused_per_image", "small_blocks"])
@pytest.mark.parametrize("dense", [False, True], ids=["candidates", "dense"])
@pytest.mark.parametrize("name", CASES)
def test_matches_v8detectionloss(name, dense, path, monkeypatch):
    if path.startswith("fused"):  # the one-pass head kernel (run eagerly) that inputs above the size threshold take
        monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "0")
        monkeypatch.setenv("DETLOSS_COMPILE", "0")
    if path == "fused_per_image":  # the class BCE image by image (what large levels take)
        from detloss.losses import _head_maps

        monkeypatch.setattr(_head_maps, "PER_IMAGE_NUMEL", 0)
    if path == "small_blocks":  # the assigner's decoding in blocks of a few rows (large inputs take blocks)
        monkeypatch.setattr(y8, "DECODE_BLOCK_ROWS", 3)
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


class FixedAssignment(YOLOv8Loss):
    """The loss with its assignment step computed once and then held fixed."""

    fixed = None

    def assignment(self, inputs, prepared):
        if self.fixed is None:
            self.fixed = super().assignment(inputs, prepared)
        return self.fixed


def test_gradcheck_float64():
    """Gradients of the class and DFL terms are exact for a fixed assignment. (TAL's soft targets are
    computed without gradient, and CIoU's aspect weight is held constant as in the reference, so the
    total is not differentiated exactly on purpose; those gradients are checked against the reference.)"""
    feats, targets = small_problem(reg_max=4, hw=(32, 32), n=3, bs=1, nc=2)
    loss_fn = FixedAssignment(2, reg_max=4, box=0.0)
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


def test_reduce_across_ranks_is_a_no_op_on_one_process():
    """(Under 2 gloo ranks: tests/test_distributed.py.)"""
    feats, targets = small_problem(n=6)
    local = YOLOv8Loss(3, reg_max=4)(feats, targets)
    out = YOLOv8Loss(3, reg_max=4, reduce_across_ranks=True)(feats, targets)
    assert out.total == local.total and out.stats == local.stats


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
        YOLOv8Loss(3, reg_max=0)  # reg_max 1 is the DFL-free head (tests/losses/test_yolo26.py)


def test_assign_is_a_flat_assignment_of_target_rows():
    """assign(): the positives, image-major then anchor; target_index the row of ``targets``; the
    reference's dense outputs in extras (and unpacking like its tuple)."""
    from detloss.assign.base import Assignment
    from detloss.assign.tal import TAL_OUTPUTS, TALAssignment

    d, cfg = load("c07_crowded.npz")
    loss_fn = build(cfg)
    feats, targets = [d[f"feat{i}"] for i in range(3)], rows(d)
    asg = loss_fn.assign(feats, targets)
    assert isinstance(asg, TALAssignment) and isinstance(asg, Assignment)
    fg = asg.fg_mask
    assert asg.num_pos == int(fg.sum()) == loss_fn(feats, targets).stats["num_pos"]
    assert torch.equal(asg.foreground(), fg)
    b, a = fg.nonzero(as_tuple=True)
    assert torch.equal(asg.batch_index, b) and torch.equal(asg.pred_index, a)
    # the target row: same image, and its class and box are the assigned ones
    assert torch.equal(targets[asg.target_index, 0].long(), b)
    assert torch.equal(targets[asg.target_index, 1].long(), asg.labels)
    torch.testing.assert_close(asg.boxes, asg.target_bboxes[b, a], rtol=0, atol=0)
    torch.testing.assert_close(asg.weights, asg.target_scores.sum(-1)[b, a], rtol=0, atol=0)
    labels, bboxes, scores, fg2, gt_idx = asg
    assert fg2 is fg and scores is asg.target_scores and list(TAL_OUTPUTS) == list(asg._fields)


def test_terms_sum_to_total_and_stats_types():
    from detloss.losses.base import STAT_KEYS

    feats, targets = small_problem(n=6)
    feats = [f.requires_grad_(True) for f in feats]
    out = YOLOv8Loss(3, reg_max=4)(feats, targets)
    assert set(out.terms) == {"box", "cls", "dfl"} and all(t.requires_grad for t in out.terms.values())
    torch.testing.assert_close(sum(out.terms.values()), out.total, rtol=1e-12, atol=0)
    for k, t in out.terms.items():
        torch.testing.assert_close(t.detach(), out.components[k] * 2, rtol=1e-12, atol=0)
    for k, typ in STAT_KEYS.items():
        assert type(out.stats[k]) is typ, k
    assert out.stats["normalizer"] == out.stats["target_scores_sum"]


def test_decode_is_the_inference_decoding():
    """Boxes: per level, each side the expectation of its softmax times the stride around the cell
    centre; scores: the sigmoid of the class logits (computed here level by level)."""
    feats, _ = small_problem(n=0)
    loss_fn = YOLOv8Loss(3, reg_max=4)
    boxes, scores = loss_fn.decode(feats)
    want_boxes, want_scores = [], []
    for f, s in zip(feats, (8, 16, 32)):
        bsz, _, h, w = f.shape
        p = torch.softmax(f[:, :16].reshape(bsz, 4, 4, h, w), 2)
        dist = (p * torch.arange(4.0, dtype=torch.float64).view(1, 1, 4, 1, 1)).sum(2)  # [B, 4, h, w]
        ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5, indexing="ij")
        box = torch.stack((xs - dist[:, 0], ys - dist[:, 1], xs + dist[:, 2], ys + dist[:, 3]), -1) * s
        want_boxes.append(box.reshape(bsz, -1, 4))
        want_scores.append(torch.sigmoid(f[:, 16:]).flatten(2).transpose(1, 2))
    torch.testing.assert_close(boxes, torch.cat(want_boxes, 1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(scores, torch.cat(want_scores, 1), rtol=0, atol=0)


# ------------------------------------------------------------------ hostile input


@pytest.mark.parametrize(
    "sizes",
    [[(8, 8)] * 3, [(2, 2), (4, 4), (8, 8)], [(8, 8), (4, 4), (4, 4)], [(8, 8), (4, 8), (2, 2)]],
    ids=["same_size_every_level", "levels_reversed", "last_level_too_big", "one_axis_off"],
)
def test_level_sizes_that_fit_no_image_are_refused(sizes):
    loss_fn = YOLOv8Loss(3, reg_max=4)
    feats = [torch.randn(1, 19, h, w) for h, w in sizes]
    targets = torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]])
    with pytest.raises(ValueError, match=r"feats: expected level sizes that one image size gives at strides"):
        loss_fn(feats, targets)
    with pytest.raises(ValueError, match=r"feats: expected level sizes"):
        loss_fn.decode(feats)


@pytest.mark.parametrize(
    "sizes",
    [[(80, 80), (40, 40), (20, 20)], [(13, 9), (7, 5), (4, 3)], [(12, 12), (6, 6), (3, 3)], [(1, 1), (1, 1), (1, 1)]],
    ids=["640", "100x68_ceil", "100_floor", "tiny"],
)
def test_level_sizes_of_one_image_are_accepted(sizes):
    # ceil(H / s) at every level (stride-2 convolutions with padding), or floor(H / s) (pooling)
    feats = [torch.randn(1, 19, h, w) for h, w in sizes]
    out = YOLOv8Loss(3, reg_max=4)(feats, torch.tensor([[0, 1, 0.5, 0.5, 0.3, 0.3]]))
    assert torch.isfinite(out.total)


def test_a_batch_of_zero_images_is_a_zero_loss_with_a_graph():
    loss_fn = YOLOv8Loss(3, reg_max=4)
    feats = [torch.randn(0, 19, s, s, dtype=torch.float64, requires_grad=True) for s in (8, 4, 2)]
    out = loss_fn(feats, torch.zeros(0, 6, dtype=torch.float64))
    assert out.total.requires_grad and float(out.total.detach()) == 0.0
    grads = torch.autograd.grad(out.total, feats)
    assert [g.shape for g in grads] == [f.shape for f in feats]
    assert out.stats["num_pos"] == out.stats["num_targets"] == out.stats["matched_targets"] == 0
    assert out.stats["normalizer"] == 1.0 and out.stats["iou_mean"] == 0.0
    assert all(float(v) == 0.0 for v in out.components.values())
    decoded = loss_fn.decode(feats)
    assert decoded.boxes.shape == (0, 84, 4) and decoded.scores.shape == (0, 84, 3)
    assert loss_fn.assign(feats, torch.zeros(0, 6, dtype=torch.float64)).num_pos == 0


def test_a_box_centred_at_the_origin_is_dropped_visibly():
    """ultralytics' padding rule (x1 + y1 + x2 + y2 > 0) takes a box centred at (0, 0) for padding:
    the loss keeps the rule (the same loss as without that row), counts the row in
    stats["dropped_targets"] and warns."""
    feats, targets = small_problem(n=4)
    corner = torch.tensor([[0, 1, 0.0, 0.0, 0.3, 0.2]], dtype=torch.float64)
    loss_fn = YOLOv8Loss(3, reg_max=4)
    with pytest.warns(y8.PaddingRuleWarning, match=r"targets: 1 row\(s\) centred at \(0, 0\) were dropped"):
        out = loss_fn(feats, torch.cat((targets, corner)))
    want = loss_fn(feats, targets)
    assert out.total == want.total
    assert out.stats["dropped_targets"] == 1 and out.stats["num_targets"] == 4
    assert want.stats["dropped_targets"] == 0
    # a centre just off the corner is a box like any other
    corner[0, 2] = 1e-3
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", y8.PaddingRuleWarning)
        kept = loss_fn(feats, torch.cat((targets, corner)))
    assert kept.stats["num_targets"] == 5 and kept.stats["dropped_targets"] == 0
    assert "x1 + y1 + x2 + y2 > 0" in YOLOv8Loss.__doc__ and "dropped_targets" in YOLOv8Loss.__doc__


def test_autocast_bfloat16_changes_nothing():
    """Inside torch.autocast the loss is computed as outside it: the box decoding's matmul (the
    expectation of each side's distribution) does not drop to bfloat16."""
    feats, targets = small_problem(n=6, dtype=torch.float32)
    loss_fn = YOLOv8Loss(3, reg_max=4)
    plain = [f.clone().requires_grad_(True) for f in feats]
    auto = [f.clone().requires_grad_(True) for f in feats]
    want = loss_fn(plain, targets)
    want.total.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(auto, targets)
        decoded = loss_fn.decode(feats)
    got.total.backward()
    assert got.stats["num_pos"] > 0
    for k in want.components:
        assert torch.equal(got.components[k], want.components[k]), k
    for a, b in zip(auto, plain):
        assert torch.equal(a.grad, b.grad)
    ref = loss_fn.decode(feats)
    assert decoded.boxes.dtype == torch.float32 and torch.equal(decoded.boxes, ref.boxes)


@pytest.mark.compiled
def test_compiled_head_pass_matches_v8detectionloss(monkeypatch):
    """The head pass compiled (what large inputs run), on one reference case, float64."""
    monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "0")
    monkeypatch.setenv("DETLOSS_COMPILE", "1")
    name = next(c for c in CASES if c != "c04_no_targets.npz")
    d, cfg = load(name)
    out, grads = run(build(cfg), d)
    torch.testing.assert_close(out.total, d["loss_sum"], rtol=1e-6, atol=0)
    for i, g in enumerate(grads):
        close(g, d[f"grad_feat{i}"])


def test_make_anchors_keeps_recent_grids_and_rebuilds_a_modified_one():
    """make_anchors returns the same tensors for a grid it built recently (no rebuild per call);
    a grid modified in place, another dtype or inference mode gets tensors of its own; the values
    are always the grid's (cell centres in grid units, the level's stride)."""
    from detloss.anchors import make_anchors

    levels = [(3, 4, 8.0), (2, 2, 16.0)]
    pts, strides = make_anchors(levels, torch.float32)
    want_pts = torch.tensor([[x + 0.5, y + 0.5] for y in range(3) for x in range(4)]
                            + [[x + 0.5, y + 0.5] for y in range(2) for x in range(2)])
    torch.testing.assert_close(pts, want_pts, rtol=0, atol=0)
    torch.testing.assert_close(strides[:, 0], torch.tensor([8.0] * 12 + [16.0] * 4), rtol=0, atol=0)
    again = make_anchors(levels, torch.float32)
    assert again[0] is pts and again[1] is strides
    pts.mul_(0)  # a caller modified them: the next call builds them anew
    fresh, _ = make_anchors(levels, torch.float32)
    assert fresh is not pts
    torch.testing.assert_close(fresh, want_pts, rtol=0, atol=0)
    assert make_anchors(levels, torch.float64)[0].dtype == torch.float64
    with torch.inference_mode():
        inf_pts, _ = make_anchors(levels, torch.float32)
    assert inf_pts is not fresh and inf_pts.is_inference() and not fresh.is_inference()
