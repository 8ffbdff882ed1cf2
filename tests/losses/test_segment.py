"""YOLOv8SegmentLoss and YOLO26SegmentLoss (and end to end) against ultralytics'
v8SegmentationLoss / SegmentLoss26 / E2ELoss(SegmentLoss26): loss vector, items, gradients and the
assignment, with and without overlap masks, masks at 1x and 2x the prototypes; bad input, properties.

Reference data: tests/data/ultralytics_tasks (seg01..seg04), whose manifest's SOURCE line reads:
"ultralytics 8.4.190, files ultralytics/utils/loss.py (v8DetectionLoss, BboxLoss, DFLoss,
E2EDetectLoss, E2ELoss, v8OBBLoss, RotatedBboxLoss, v8PoseLoss, PoseLoss26, KeypointLoss, RLELoss,
v8SegmentationLoss, SegmentLoss26, BCEDiceLoss), utils/tal.py (TaskAlignedAssigner,
RotatedTaskAlignedAssigner, PoseTaskAlignedAssigner, SegTaskAlignedAssigner, make_anchors),
utils/metrics.py (bbox_iou, probiou), nn/tasks.py (init_criterion), nn/modules/head.py and
nn/modules/block.py (heads, RealNVP), run unmodified on CPU with torch 2.14.1+cu130,
torch.set_default_dtype(torch.float64) (float32 for the Segment26 cases)".
ultralytics' v8SegmentationLoss also returns a constant sem_loss 0 (checked in the drop-in tests).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detloss.losses.tasks import end_to_end
from detloss.losses.e2e import EndToEndLoss
from detloss.losses.segment import YOLO26SegmentLoss, YOLOv8SegmentLoss
from reference_cases import (
    assert_rel_close, case_names, detect_maps, level_maps, load_case, manifest_entry, schedule_points, target_rows,
    task_batch, task_preds,
)

FOLDER = "ultralytics_tasks"
SEG = case_names(FOLDER, "seg*.npz")


def native(cfg):
    m = cfg["model"]
    head, args = m["head"], m["args"]
    kw = dict(box=args["box"], cls=args["cls"], dfl=args["dfl"], seg=args["box"], overlap_masks=args["overlap_mask"])
    cls = YOLOv8SegmentLoss
    if head["type"] == "Segment26":
        cls, kw["sem"] = YOLO26SegmentLoss, args["box"]
    if "one2one_cv2" in head:
        return end_to_end(cls, head["nc"], head["stride"], head["reg_max"], epochs=args["epochs"], **kw)
    return cls(head["nc"], head["stride"], head["reg_max"], **kw)


def head_outputs(branch):
    """(feats, mask coefficients, prototypes[, semantic logits]) of one head."""
    proto = branch["proto"]
    protos = tuple(proto) if isinstance(proto, tuple) else (proto,)
    return (detect_maps(branch), level_maps(branch["mask_coefficient"], branch["feats"]), *protos)


def call(loss, preds, batch, method="__call__"):
    rows, masks = target_rows(batch), batch["masks"]
    branch = preds.get("one2many", preds)
    tail = (rows, masks) + ((batch["sem_masks"],) if isinstance(branch["proto"], tuple) else ())
    if isinstance(loss, EndToEndLoss):
        return getattr(loss, method)(head_outputs(preds["one2many"]), head_outputs(preds["one2one"]), *tail)
    return getattr(loss, method)(*head_outputs(preds), *tail)


@pytest.mark.parametrize("name", SEG)
def test_matches_ultralytics(name):
    arrays, cfg = load_case(FOLDER, name)
    tol = cfg["tolerance"]
    loss = native(cfg)
    batch = task_batch(arrays)
    names = cfg["item_names"] if "Segment26" == cfg["model"]["head"]["type"] else cfg["item_names"][:-1]
    for k, point in zip(schedule_points(cfg), cfg["schedule"]):
        while isinstance(loss, EndToEndLoss) and loss.updates < k:
            loss.update()
        preds, leaves = task_preds(arrays, cfg)
        out = call(loss, preds, batch)
        assert [f"{c}_loss" for c in out.components] == names
        n = len(names)
        assert_rel_close(torch.stack(list(out.terms.values())), arrays[f"loss.u{k}"][:n], tol, f"loss.u{k}")
        assert_rel_close(torch.stack(list(out.components.values())), arrays[f"items.u{k}"][:n], tol, f"items.u{k}")
        if k in cfg["grad_points"]:
            grads = torch.autograd.grad(out.total, list(leaves.values()))
            for path, g in zip(leaves, grads):
                assert g.dtype == arrays[path].dtype
                assert_rel_close(g, arrays[f"grad.u{k}.{path[len('pred.'):]}"], tol, path)


@pytest.mark.parametrize("name", SEG)
def test_assignment_matches_ultralytics(name):
    arrays, cfg = load_case(FOLDER, name)
    entry = manifest_entry(FOLDER, name)
    loss = native(cfg)
    preds, _ = task_preds(arrays, cfg)
    batch = task_batch(arrays)
    asg = call(loss, preds, batch, "assign")
    pairs = [("one2many", asg.one2many), ("one2one", asg.one2one)] if isinstance(loss, EndToEndLoss) else [("main", asg)]
    img = target_rows(batch)[:, 0].long()
    first = torch.searchsorted(img, torch.arange(int(img.max()) + 2))
    rtol = 1e-9 if cfg["dtype"] == "float64" else 1e-5
    for branch, a in pairs:
        assert torch.equal(a.foreground(), arrays[f"assign.{branch}.fg_mask"])
        assert a.num_pos == entry["assignment"][branch]["num_fg"]
        within = a.target_index - first[a.batch_index]
        assert torch.equal(within, arrays[f"assign.{branch}.target_gt_idx"][a.batch_index, a.pred_index])
        torch.testing.assert_close(a.target_scores, arrays[f"assign.{branch}.target_scores"], rtol=rtol, atol=1e-7)


# ---------------------------------------------------------------------------------------- synthetic
def synthetic(bsz=2, nc=2, reg_max=16, nm=4, n=5, seed=0, levels=((8, 8), (4, 4), (2, 2)), dtype=torch.float64,
              overlap=True, mask_hw=(16, 16)):
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(True)
    feats = [leaf(bsz, 4 * reg_max + nc, h, w) for h, w in levels]
    coef = [leaf(bsz, nm, h, w) for h, w in levels]
    proto = leaf(bsz, nm, 16, 16)
    semantic = leaf(bsz, nc, 8, 8)
    img = torch.arange(n).remainder(bsz).sort().values[:, None].to(torch.float64)
    cls = torch.randint(0, nc, (n, 1), generator=g).to(torch.float64)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.5 + 0.25
    wh = torch.rand(n, 2, generator=g, dtype=torch.float64) * 0.3 + 0.1
    rows = torch.cat((img, cls, xy, wh), 1)
    hm, wm = mask_hw
    per = (torch.rand(n, hm, wm, generator=g) > 0.6).to(torch.uint8)
    if overlap:
        masks = torch.zeros(bsz, hm, wm, dtype=torch.uint8)
        slot = torch.zeros(n, dtype=torch.long)
        for i in range(n):  # a test fixture: the instance-index map of each image
            b = int(img[i])
            slot[i] = int((img[:i, 0] == b).sum())
            masks[b][per[i] > 0] = slot[i] + 1
    else:
        masks = per
    sem = rows[:, 1][torch.randint(0, n, (bsz, hm, wm), generator=g)].to(torch.float32)
    return feats, coef, proto, semantic, rows, masks, sem


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
       scale=st.sampled_from([1.0, 30.0, 1e3]), seed=st.integers(0, 1000), overlap=st.booleans(),
       yolo26=st.booleans(), empty=st.booleans(), size=st.sampled_from([(16, 16), (32, 32), (8, 8)]))
def test_properties(dtype, scale, seed, overlap, yolo26, empty, size):
    feats, coef, proto, semantic, rows, masks, sem = synthetic(seed=seed, dtype=dtype, overlap=overlap, mask_hw=size)
    with torch.no_grad():
        for f in feats + coef + [proto, semantic]:
            f.mul_(scale)
    if empty:
        rows = rows[:0]
        masks = masks if overlap else masks[:0]
    if yolo26:
        loss = YOLO26SegmentLoss(2, reg_max=16, overlap_masks=overlap, num_masks=4)
        out = loss(feats, coef, proto, semantic, rows, masks, sem)
        leaves = feats + coef + [proto, semantic]
    else:
        loss = YOLOv8SegmentLoss(2, overlap_masks=overlap, num_masks=4)
        out = loss(feats, coef, proto, rows, masks)
        leaves = feats + coef + [proto]
    want = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.total.dtype == want and torch.isfinite(out.total)
    for g, x in zip(torch.autograd.grad(out.total, leaves, allow_unused=True), leaves):
        if g is not None:
            assert g.dtype == dtype and not torch.isnan(g).any()


def test_mask_term_equals_a_loop_over_positives():
    """seg = sum over positives of the cropped, area-normalized BCE of coef @ proto / P."""
    feats, coef, proto, _, rows, masks, _ = synthetic(overlap=False, mask_hw=(32, 32))
    loss = YOLOv8SegmentLoss(2, overlap_masks=False, num_masks=4)
    out = loss(feats, coef, proto, rows, masks)
    asg = loss.assign(feats, coef, proto, rows, masks)
    up = torch.nn.functional.interpolate(proto.detach(), (32, 32), mode="bilinear", align_corners=False)
    flat_coef = torch.cat([c.detach().flatten(2) for c in coef], 2).permute(0, 2, 1)
    total = 0.0
    for b, a, r, box in zip(asg.batch_index, asg.pred_index, asg.target_index, asg.boxes):
        logits = torch.einsum("c,chw->hw", flat_coef[b, a], up[b])
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, masks[r].double(), reduction="none")
        x1, y1, x2, y2 = (box / 64 * 32).tolist()
        jj, ii = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="xy")
        inside = (jj >= x1) & (jj < x2) & (ii >= y1) & (ii < y2)
        area = float((box[2] - box[0]) * (box[3] - box[1])) / (64 * 64)
        total += float((bce * inside).mean()) / area
    expected = total / asg.num_pos * 7.5
    assert abs(float(out.components["seg"]) - expected) <= 1e-9 * expected


# ---------------------------------------------------------------------------------------- bad input
def test_bad_input():
    feats, coef, proto, semantic, rows, masks, sem = synthetic()
    loss = YOLOv8SegmentLoss(2, num_masks=4)
    with pytest.raises(ValueError, match=r"masks: expected the image's aspect ratio 64:64 \(Hm \* W == Wm \* H\), got size \(16, 12\)"):
        loss(feats, coef, proto, rows, masks[..., :12])
    with pytest.raises(ValueError, match=r"masks: expected shape \[2, Hm, Wm\] \(one instance-index map per image \(overlap_masks\)\), got \(5, 16, 16\)"):
        loss(feats, coef, proto, rows, torch.zeros(5, 16, 16))
    with pytest.raises(ValueError, match=r"masks: expected shape \[5, Hm, Wm\] \(one mask per target row\), got \(2, 16, 16\)"):
        YOLOv8SegmentLoss(2, num_masks=4, overlap_masks=False)(feats, coef, proto, rows, masks)
    with pytest.raises(ValueError, match=r"mask_coef\[0\]: expected shape \(2, 32, 8, 8\) \(num_masks = 32 coefficients\), got \(2, 4, 8, 8\)"):
        YOLOv8SegmentLoss(2)(feats, coef, proto, rows, masks)
    with pytest.raises(ValueError, match=r"proto: expected shape \[2, 4, h, w\], got \(1, 4, 16, 16\)"):
        loss(feats, coef, proto[:1], rows, masks)
    with pytest.raises(ValueError, match=r"mask_coef\[0\]: expected shape \(2, 4, 8, 8\) \(num_masks = 4 coefficients\), got \(2, 3, 8, 8\)"):
        loss(feats, [c[:, :3] for c in coef], proto, rows, masks)
    with pytest.raises(ValueError, match=r"feats\[0\]: expected shape \[2, 67 \(= 4 \* reg_max 16 \+ nc 3\)"):
        YOLOv8SegmentLoss(3, num_masks=4)(feats, coef, proto, rows, masks)
    seg26 = YOLO26SegmentLoss(2, reg_max=16, num_masks=4)
    with pytest.raises(ValueError, match=r"sem_masks: expected shape \(2, 16, 16\) \(one class map per image, the size of masks\), got \(2, 8, 8\)"):
        seg26(feats, coef, proto, semantic, rows, masks, sem[:, :8, :8])
    with pytest.raises(ValueError, match=r"sem_masks: expected class ids in \[0, 1\]"):
        seg26(feats, coef, proto, semantic, rows, masks, sem + 5)
    with pytest.raises(ValueError, match=r"semantic: expected shape \[2, 2, h, w\], got \(2, 3, 8, 8\)"):
        seg26(feats, coef, proto, torch.zeros(2, 3, 8, 8, dtype=torch.float64), rows, masks, sem)


# ---------------------------------------------------------------------------------------- gradcheck
@pytest.mark.parametrize("yolo26, overlap", [(False, True), (False, False), (True, True)])
def test_gradcheck_for_a_fixed_assignment(yolo26, overlap):
    """The mask term (decoded from coefficients and prototypes, again in backward), classification,
    DFL and (YOLO26) the semantic BCE + Dice term are differentiated exactly w.r.t. every head
    output for a fixed assignment (box gain 0: the CIoU's aspect weight is held constant as in
    ultralytics, checked against the reference above)."""
    feats, coef, proto, semantic, rows, masks, sem = synthetic(bsz=1, reg_max=4, nm=3, n=3, seed=4, overlap=overlap,
                                                               levels=((4, 4), (2, 2), (1, 1)), mask_hw=(8, 8))
    proto = proto[:, :, :8, :8].detach().requires_grad_(True)
    semantic = semantic[:, :, :4, :4].detach().requires_grad_(True)
    n = len(feats)
    if yolo26:
        loss = YOLO26SegmentLoss(2, reg_max=4, overlap_masks=overlap, num_masks=3, box=0.0)
        call = lambda x: loss(list(x[:n]), list(x[n:2 * n]), x[2 * n], x[2 * n + 1], rows, masks, sem)
        leaves = tuple(feats + coef + [proto, semantic])
        fixed = loss.assign(feats, coef, proto, semantic, rows, masks, sem)
    else:
        loss = YOLOv8SegmentLoss(2, reg_max=4, overlap_masks=overlap, num_masks=3, box=0.0)
        call = lambda x: loss(list(x[:n]), list(x[n:2 * n]), x[2 * n], rows, masks)
        leaves = tuple(feats + coef + [proto])
        fixed = loss.assign(feats, coef, proto, rows, masks)
    assert fixed.num_pos > 0
    loss.assignment = lambda inputs, prepared: fixed
    out = call(leaves)
    assert all(float(out.components[k]) > 0 for k in (("seg", "sem") if yolo26 else ("seg",)))
    assert torch.autograd.gradcheck(lambda *x: call(x).total, leaves, fast_mode=True)
