"""YOLO26 / YOLOv10 detection through detloss's own API: YOLOv8Loss with ``reg_max=1`` (the L1
term) and ``class_weights``, EndToEndLoss over two YOLOv8Loss branches, against ultralytics'
criteria; gradcheck of the new pieces, properties and bad input.

Reference data: tests/data/ultralytics_tasks (det01..det08), whose manifest's SOURCE line reads:
"ultralytics 8.4.190, files ultralytics/utils/loss.py (v8DetectionLoss, BboxLoss, DFLoss,
E2EDetectLoss, E2ELoss, v8OBBLoss, RotatedBboxLoss, v8PoseLoss, PoseLoss26, KeypointLoss, RLELoss,
v8SegmentationLoss, SegmentLoss26, BCEDiceLoss), utils/tal.py (TaskAlignedAssigner,
RotatedTaskAlignedAssigner, PoseTaskAlignedAssigner, SegTaskAlignedAssigner, make_anchors),
utils/metrics.py (bbox_iou, probiou), nn/tasks.py (init_criterion), nn/modules/head.py and
nn/modules/block.py (heads, RealNVP), run unmodified on CPU with torch 2.14.1+cu130,
torch.set_default_dtype(torch.float64) (float32 for the Segment26 cases)".
The head outputs ``boxes [B, 4 * reg_max, A]`` / ``scores [B, nc, A]`` are cut per level and
concatenated into the per-level maps ``YOLOv8Loss`` takes; gradients flow back to the arrays.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from detloss import YOLOv8Loss
from detloss.losses.e2e import EndToEndAssignment, EndToEndLoss
from reference_cases import case_names, load_case, schedule_points, task_batch, task_preds

FOLDER = "ultralytics_tasks"
DET = case_names(FOLDER, "det*.npz")


def close(actual, expected, rtol=1e-6, atol=1e-9):
    """Relative to the largest magnitude of the expected array (config.tolerance's rtol / atol)."""
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    if actual.numel():
        assert float((actual.detach() - expected).abs().max()) <= rtol * scale + atol


def per_level(branch, strides):
    """``(boxes, scores, feats)`` of one head -> the per-level maps ``[B, 4R + nc, H, W]``."""
    out, off = [], 0
    for f in branch["feats"]:
        h, w = f.shape[2:]
        sl = slice(off, off + h * w)
        out.append(torch.cat((branch["boxes"][:, :, sl], branch["scores"][:, :, sl]), 1).unflatten(2, (h, w)))
        off += h * w
    return out


def rows(batch):
    return torch.cat((batch["batch_idx"][:, None], batch["cls"], batch["bboxes"]), 1)


def native(cfg, **kw):
    """detloss's own loss for a case: YOLOv8Loss, or EndToEndLoss of two for end-to-end heads."""
    m = cfg["model"]
    head, args = m["head"], m["args"]
    cw = m.get("class_weights")
    common = dict(strides=head["stride"], reg_max=head["reg_max"], box=args["box"], cls=args["cls"], dfl=args["dfl"],
                  class_weights=None if cw is None else torch.tensor(cw["values"], dtype=torch.float32), **kw)
    if "one2one_cv2" not in head:
        return YOLOv8Loss(head["nc"], **common)
    weighting = "sum" if cfg["api"] == "E2EDetectLoss" else "schedule"
    return EndToEndLoss.from_loss(YOLOv8Loss, head["nc"], epochs=args.get("epochs"), weighting=weighting, **common)


def call(loss, preds, targets, strides):
    if isinstance(loss, EndToEndLoss):
        return loss(per_level(preds["one2many"], strides), per_level(preds["one2one"], strides), targets)
    return loss(per_level(preds, strides), targets)


@pytest.mark.parametrize("dense", [False, True], ids=["candidates", "dense"])
@pytest.mark.parametrize("name", DET)
def test_matches_ultralytics(name, dense):
    arrays, cfg = load_case(FOLDER, name)
    tol = cfg["tolerance"]
    loss = native(cfg, dense_assigner=dense)
    strides = cfg["model"]["head"]["stride"]
    targets = rows(task_batch(arrays))
    for k, point in zip(schedule_points(cfg), cfg["schedule"]):
        while isinstance(loss, EndToEndLoss) and loss.weighting == "schedule" and loss.updates < k:
            loss.update()
        if point["o2m"] is not None:
            assert (loss.o2m, loss.o2o) == (point["o2m"], point["o2o"])
        preds, leaves = task_preds(arrays, cfg)
        out = call(loss, preds, targets, strides)
        assert [f"{c}_loss" for c in out.components] == cfg["item_names"]
        vector = torch.stack(list(out.terms.values()))
        close(vector, arrays[f"loss.u{k}"], tol["rtol"], tol["atol"])
        close(torch.stack(list(out.components.values())), arrays[f"items.u{k}"], tol["rtol"], tol["atol"])
        torch.testing.assert_close(out.total, vector.sum(), rtol=1e-14, atol=0)
        if k in cfg["grad_points"]:
            grads = torch.autograd.grad(out.total, list(leaves.values()))
            for (path, _), g in zip(leaves.items(), grads):
                assert g.dtype == torch.float64
                close(g, arrays[f"grad.u{k}.{path[len('pred.'):]}"], tol["rtol"], tol["atol"])


@pytest.mark.parametrize("name", DET)
def test_assignment_matches_ultralytics(name):
    arrays, cfg = load_case(FOLDER, name)
    loss = native(cfg)
    preds, _ = task_preds(arrays, cfg)
    strides = cfg["model"]["head"]["stride"]
    targets = rows(task_batch(arrays))
    if isinstance(loss, EndToEndLoss):
        asg = loss.assign(per_level(preds["one2many"], strides), per_level(preds["one2one"], strides), targets)
        assert isinstance(asg, EndToEndAssignment)
        pairs = [("one2many", asg.one2many), ("one2one", asg.one2one)]
    else:
        pairs = [("main", loss.assign(per_level(preds, strides), targets))]
    for branch, a in pairs:
        fg = arrays[f"assign.{branch}.fg_mask"]
        assert torch.equal(a.foreground(), fg)
        assert a.num_pos == int(fg.sum())  # one positive per foreground anchor
        # target_index is the row of targets; the reference's index is within the image's rows
        img = targets[:, 0].long()
        first_row = torch.searchsorted(img, torch.arange(fg.shape[0]))
        within = a.target_index - first_row[a.batch_index]
        assert torch.equal(within, arrays[f"assign.{branch}.target_gt_idx"][a.batch_index, a.pred_index])


# ---------------------------------------------------------------------------- reg_max = 1 and class weights
def _problem(reg_max=1, nc=3, bs=2, size=64, n=4, seed=0, dtype=torch.float64, strides=(8, 16, 32)):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(bs, 4 * reg_max + nc, size // s, size // s, generator=g, dtype=dtype) for s in strides]
    if reg_max == 1:  # raw ltrb distances in grid units, mostly positive
        for f in feats:
            f[:, :4] = f[:, :4].abs() * 1.5 + 0.2
    wh = torch.rand(bs * n, 2, generator=g, dtype=torch.float64) * 0.5 + 0.1
    c = wh / 2 + torch.rand(bs * n, 2, generator=g, dtype=torch.float64) * (1 - wh)
    img = torch.arange(bs, dtype=torch.float64).repeat_interleave(n)
    cls = torch.randint(0, nc, (bs * n,), generator=g).to(torch.float64)
    return feats, torch.cat((img[:, None], cls[:, None], c, wh), 1)


def test_reg_max_1_l1_term_formula():
    """The L1 term against an independent computation from the assignment (manifest notes:
    ltrb times the stride over the image width (l, r) / height (t, b), mean over the sides,
    weighted by the target score, over S; the dfl gain)."""
    feats, targets = _problem(size=96, strides=(8, 16, 32))
    feats = [torch.cat((f, f), 3) for f in feats]  # non-square: 96 x 192
    loss = YOLOv8Loss(3, reg_max=1, dfl=2.0)
    out = loss(feats, targets)
    assert list(out.components) == ["box", "cls", "l1"]
    a = loss.assign(feats, targets)
    h, w = feats[0].shape[2] * 8, feats[0].shape[3] * 8
    pts, strides = [], []
    for f, s in zip(feats, (8, 16, 32)):
        ys, xs = torch.meshgrid(torch.arange(f.shape[2]) + 0.5, torch.arange(f.shape[3]) + 0.5, indexing="ij")
        pts.append(torch.stack((xs, ys), -1).reshape(-1, 2) * s)
        strides.append(torch.full((f.shape[2] * f.shape[3],), float(s)))
    pts, strides = torch.cat(pts).double(), torch.cat(strides).double()
    dist = torch.cat([f[:, :4].flatten(2) for f in feats], 2).permute(0, 2, 1)[a.batch_index, a.pred_index]
    anchor = pts[a.pred_index]
    tgt_ltrb = torch.cat((anchor - a.boxes[:, :2], a.boxes[:, 2:] - anchor), 1)  # pixels
    scale = torch.tensor([w, h, w, h], dtype=torch.float64)
    l1 = ((dist * strides[a.pred_index, None] - tgt_ltrb).abs() / scale).mean(1)
    norm = max(float(a.extras["target_scores"].sum()), 1.0)
    want = float((l1 * a.weights).sum()) / norm * 2.0
    assert float(out.components["l1"]) == pytest.approx(want, rel=1e-12)


def test_class_weights_multiply_the_per_class_bce():
    feats, targets = _problem(reg_max=16, nc=4, seed=3)
    w = torch.tensor([0.5, 2.0, 1.0, 0.0])
    plain, weighted = YOLOv8Loss(4), YOLOv8Loss(4, class_weights=w)
    a = plain.assign(feats, targets)
    logits = torch.cat([f[:, 64:].flatten(2) for f in feats], 2).permute(0, 2, 1)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, a.extras["target_scores"], reduction="none")
    norm = max(float(a.extras["target_scores"].sum()), 1.0)
    out = weighted(feats, targets)
    assert float(out.components["cls"]) == pytest.approx(float((bce * w).sum()) / norm * 0.5, rel=1e-12)
    ones = YOLOv8Loss(4, class_weights=torch.ones(4))(feats, targets)
    torch.testing.assert_close(ones.total, plain(feats, targets).total, rtol=1e-15, atol=0)
    for k in ("box", "dfl"):
        torch.testing.assert_close(out.components[k], plain(feats, targets).components[k], rtol=0, atol=0)


@pytest.mark.parametrize("reg_max, weights", [(1, None), (1, [0.3, 1.7, 1.0]), (4, [0.3, 1.7, 1.0])])
def test_gradcheck_new_pieces(reg_max, weights):
    """The L1 term and the class-weighted BCE are differentiated exactly for a fixed assignment (the
    soft targets carry no gradient on purpose, and the box term's CIoU holds its aspect weight
    constant as the reference does: box gain 0 here; those gradients are checked against the
    reference above)."""
    feats, targets = _problem(reg_max=reg_max, bs=1, size=32, n=2, seed=5)
    feats = [f.requires_grad_(True) for f in feats]
    cw = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    loss = YOLOv8Loss(3, reg_max=reg_max, box=0.0, class_weights=cw)
    fixed = loss.assign(feats, targets)
    assert fixed.num_pos > 0
    loss.assignment = lambda inputs, prepared: fixed
    assert torch.autograd.gradcheck(lambda *f: loss(list(f), targets).total, tuple(feats), fast_mode=True)


def test_half_precision_reg_max_1():
    feats, targets = _problem(dtype=torch.float32)
    half = [f.half().requires_grad_(True) for f in feats]
    out = YOLOv8Loss(3, reg_max=1)(half, targets)
    assert out.total.dtype == torch.float32 and math.isfinite(float(out.total.detach()))
    ref = YOLOv8Loss(3, reg_max=1)([f.detach().float() for f in half], targets)
    torch.testing.assert_close(out.total, ref.total, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(out.total, half)
    assert all(g.dtype == torch.float16 and torch.isfinite(g).all() for g in grads)


@settings(max_examples=25, deadline=None)
@given(
    scale=st.sampled_from([1e-3, 1.0, 1e3, 1e4]),
    n=st.integers(0, 5),
    side=st.sampled_from([0.0, 1e-6, 0.3, 1.0]),
    seed=st.integers(0, 2**16),
)
def test_reg_max_1_finite_for_extreme_inputs(scale, n, side, seed):
    """Extreme logits and distances (negative ones too: ultralytics does not clamp them),
    zero-area and whole-image targets, images without objects: finite loss and gradients."""
    g = torch.Generator().manual_seed(seed)
    feats = [(torch.randn(2, 7, 64 // s, 64 // s, generator=g) * scale).requires_grad_(True) for s in (8, 16, 32)]
    wh = torch.full((n, 2), side)
    c = (wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)).clamp(0, 1)
    rows_ = torch.cat((torch.zeros(n, 1), torch.randint(0, 3, (n, 1), generator=g).float(), c, wh), 1)
    out = YOLOv8Loss(3, reg_max=1, class_weights=torch.tensor([0.0, 1.0, 3.0]))(feats, rows_)
    assert all(math.isfinite(float(v.detach())) for v in out.terms.values())
    grads = torch.autograd.grad(out.total, feats)
    assert all(torch.isfinite(gr).all() for gr in grads)


def test_decode_reg_max_1():
    feats, _ = _problem(dtype=torch.float32)
    dec = YOLOv8Loss(3, reg_max=1).decode(feats)
    f = feats[0]
    ltrb = f[0, :4, 0, 0]
    want = torch.tensor([0.5 - ltrb[0], 0.5 - ltrb[1], 0.5 + ltrb[2], 0.5 + ltrb[3]]) * 8
    torch.testing.assert_close(dec.boxes[0, 0], want)
    torch.testing.assert_close(dec.scores[0, 0], f[0, 4:, 0, 0].sigmoid())


def test_bad_input():
    for bad in (0, -1, 1.0, True):
        with pytest.raises(ValueError, match="reg_max"):
            YOLOv8Loss(3, reg_max=bad)
    feats, targets = _problem(reg_max=16)
    with pytest.raises(ValueError, match=r"4 \* reg_max 1 \+ nc 3"):
        YOLOv8Loss(3, reg_max=1)(feats, targets)  # DFL maps given to a reg_max 1 loss
    feats1, _ = _problem(reg_max=1)
    with pytest.raises(ValueError, match=r"4 \* reg_max 16 \+ nc 3"):
        YOLOv8Loss(3)(feats1, targets)
    with pytest.raises(ValueError, match="nc 4"):
        YOLOv8Loss(4, reg_max=1)(feats1, targets)
    for bad, err in (([1.0, 2.0], TypeError), (torch.ones(2), ValueError), (torch.ones(3, 1), ValueError),
                     (torch.tensor([1.0, -1.0, 1.0]), ValueError), (torch.tensor([1.0, float("nan"), 1.0]), ValueError),
                     (torch.ones(3, dtype=torch.long), TypeError)):
        with pytest.raises(err, match="class_weights"):
            YOLOv8Loss(3, class_weights=bad)
