"""YOLOv5Loss against the original ultralytics/yolov5 v7.0 ComputeLoss.

Reference data: tests/data/yolov5_v7/ (copied from the shared reference folder), whose manifest's
SOURCE line reads: "ultralytics/yolov5 tag v7.0 (commit 915bbf294bb74c859f0b41f1c23bc395014ea679):
utils/loss.py ComputeLoss, BCEBlurWithLogitsLoss, FocalLoss, QFocalLoss, smooth_BCE;
utils/metrics.py bbox_iou. Run unmodified on CPU in float64."
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

import detloss
from detloss.assign.base import rank_in_group
from detloss.losses.yolov5 import YOLOv5Loss, default_balance

DATA = Path(__file__).resolve().parents[1] / "data" / "yolov5_v7"
CASES = sorted(p.name for p in DATA.glob("c*.npz"))
MANIFEST = json.loads((DATA / "manifest.json").read_text())


def _load(name):
    d = np.load(DATA / name)
    cfg = json.loads(str(d["config"]))
    return d, cfg


def _loss_from_config(cfg, **kw):
    return YOLOv5Loss(
        cfg["nc"],
        anchors=cfg["anchors_pixels"],
        strides=cfg["strides"],
        autobalance=cfg["autobalance"],
        gr=cfg["gr"],
        **cfg["hyp"],
        **kw,
    )


def _close(actual, expected, rtol=1e-6, what=""):
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    actual = actual.detach().to(torch.float64).reshape(expected.shape)
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale * 1e-3 + 1e-300, msg=lambda m: f"{what}: {m}")


def test_reference_cases_present():
    assert len(CASES) == 12
    assert {c["file"] for c in MANIFEST["cases"]} == set(CASES)


@pytest.mark.parametrize("name", CASES)
def test_parity_float64(name):
    d, cfg = _load(name)
    loss_fn = _loss_from_config(cfg)
    preds0 = [torch.from_numpy(d[f"p{i}"]) for i in range(3)]
    targets = torch.from_numpy(d["targets"]).reshape(-1, 6)
    for call in range(cfg["calls"]):
        sfx = "" if call == 0 else f"_call{call}"
        preds = [p.clone().requires_grad_(True) for p in preds0]
        out = loss_fn(preds, targets)
        out.total.backward()
        assert out.total.dtype == torch.float64 and out.total.ndim == 0
        _close(out.total, d["loss" + sfx], what=f"{name} call {call} total")
        if call == 0:
            parts = [d["lbox"], d["lobj"], d["lcls"]]
        else:
            parts = list(d["parts" + sfx])
        for key, ref in zip(("box", "obj", "cls"), parts):
            _close(out.components[key], ref, what=f"{name} call {call} {key}")
        for i, p in enumerate(preds):
            _close(p.grad, d[f"grad_p{i}" + sfx], what=f"{name} call {call} grad p{i}")


@pytest.mark.parametrize("name", CASES)
def test_float32_matches_float64_reference(name):
    d, cfg = _load(name)
    loss_fn = _loss_from_config(cfg)
    targets = torch.from_numpy(d["targets"]).reshape(-1, 6).float()
    preds = [torch.from_numpy(d[f"p{i}"]).float().requires_grad_(True) for i in range(3)]
    out = loss_fn(preds, targets)
    out.total.backward()
    assert out.total.dtype == torch.float32
    _close(out.total, d["loss"], rtol=2e-5, what=f"{name} total")
    for key, ref in zip(("box", "obj", "cls"), (d["lbox"], d["lobj"], d["lcls"])):
        _close(out.components[key], ref, rtol=2e-5, what=f"{name} {key}")
    for i, p in enumerate(preds):
        assert p.grad.dtype == torch.float32
        ref = torch.from_numpy(d[f"grad_p{i}"])
        # float32 precision, judged against the size of the level's gradient
        torch.testing.assert_close(p.grad.double(), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def test_nc1_has_no_class_loss_and_empty_targets_only_objectness():
    preds, targets, _ = _random_case(nc=1, n=6)
    preds = [p.requires_grad_(True) for p in preds]
    out = YOLOv5Loss(1)(preds, targets)
    out.total.backward()
    assert float(out.components["cls"]) == 0.0 and out.stats["num_pos"] > 0
    assert all((p.grad[..., 5] == 0).all() for p in preds)
    assert any((p.grad[..., :4] != 0).any() for p in preds)

    d, cfg = _load("c04_bs4_nc3_empty.npz")
    preds = [torch.from_numpy(d[f"p{i}"]).requires_grad_(True) for i in range(3)]
    out = _loss_from_config(cfg)(preds, torch.zeros(0, 6, dtype=torch.float64))
    out.total.backward()
    assert float(out.components["box"]) == 0.0 and float(out.components["cls"]) == 0.0
    assert out.stats["num_pos"] == 0 and float(out.stats["iou_mean"]) == 0.0
    for p in preds:
        g = p.grad
        assert torch.isfinite(g).all()
        assert (g[..., 4] != 0).all()
        assert (g[..., :4] == 0).all() and (g[..., 5:] == 0).all()


def test_images_without_objects_get_objectness_only():
    d, cfg = _load("c02_bs2_nc3_few.npz")
    targets = torch.from_numpy(d["targets"])
    targets = targets[targets[:, 0] == 0]  # image 1 has no objects now
    preds = [torch.from_numpy(d[f"p{i}"]).requires_grad_(True) for i in range(3)]
    _loss_from_config(cfg)(preds, targets).total.backward()
    for p in preds:
        g = p.grad[1]
        assert (g[..., 4] != 0).all() and (g[..., :4] == 0).all() and (g[..., 5:] == 0).all()


def test_autobalance_state_and_reset():
    d, cfg = _load("c10_bs1_nc3_autobalance.npz")
    loss_fn = _loss_from_config(cfg)
    preds = [torch.from_numpy(d[f"p{i}"]) for i in range(3)]
    targets = torch.from_numpy(d["targets"])
    first = loss_fn(preds, targets)
    assert first.stats["balance"] == [4.0, 1.0, 0.4]
    assert loss_fn.balance != [4.0, 1.0, 0.4] and loss_fn.balance[1] == 1.0  # normalized by stride 16
    second = loss_fn(preds, targets)
    assert second.stats["balance"] != first.stats["balance"]
    loss_fn.reset_balance()
    again = loss_fn(preds, targets)
    assert float(again.total) == float(first.total)
    with pytest.raises(ValueError, match="strides"):
        YOLOv5Loss(3, anchors=((10, 13),) * 3, strides=(8, 32, 64), autobalance=True)


def _random_case(bs=2, nc=3, img=64, n=6, dtype=torch.float64, seed=0, levels=3):
    gen = torch.Generator().manual_seed(seed)
    strides = (8, 16, 32, 64, 128)[:levels]
    preds = [torch.randn(bs, 3, img // s, img // s, 5 + nc, generator=gen, dtype=torch.float64).to(dtype) for s in strides]
    wh = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.5 + 0.02
    xy = wh / 2 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * (1 - wh)
    t = torch.cat((torch.randint(0, bs, (n, 1), generator=gen).double(), torch.randint(0, nc, (n, 1), generator=gen).double(), xy, wh), 1)
    return preds, t.to(dtype), strides


def test_gradcheck_float64_objectness_and_class_terms():
    # The box term's gradient is not the true derivative in the original (CIoU's alpha under
    # no_grad, objectness target detached) and is checked against the reference instead.
    # Only parts of the two coarse levels (2x2 and 1x1 cells) vary, to keep gradcheck small.
    preds, _, _ = _random_case(bs=1, img=32, n=0, seed=1)
    # large boxes, so that the 2x2 level (anchors 1.9-7.4 cells) has positives
    targets = torch.tensor([[0, 1, 0.4, 0.6, 0.6, 0.8], [0, 2, 0.7, 0.3, 0.8, 0.6]], dtype=torch.float64)
    empty = torch.zeros(0, 6, dtype=torch.float64)
    loss_obj = YOLOv5Loss(3, obj_pw=1.3)

    def f_obj(p):  # the 1x1 level varies
        return loss_obj(preds[:2] + [torch.cat((p, preds[2][..., 6:]), -1)], empty).total

    assert torch.autograd.gradcheck(f_obj, (preds[2][..., :6].detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-7)
    loss_cls = YOLOv5Loss(3, box=0.0, obj=0.0, cls_pw=1.7, label_smoothing=0.2, fl_gamma=1.5)

    def f_cls(p):  # the class logits of the 2x2 level vary
        out = loss_cls([preds[0], torch.cat((preds[1][..., :5], p), -1), preds[2]], targets)
        assert out.stats["num_pos_per_level"][1] > 0
        return out.total

    assert torch.autograd.gradcheck(f_cls, (preds[1][..., 5:].detach().clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_gather_heads_gradcheck():
    """The one backward of the gathered objectness, box and class logits of every level."""
    from detloss.assign.yolov5 import assign_yolov5
    from detloss.losses.yolov5 import _gather_heads

    preds, _, _ = _random_case(bs=2, img=32, n=0, seed=2)
    targets = torch.tensor([[0, 1, 0.4, 0.6, 0.6, 0.8], [0, 2, 0.45, 0.55, 0.8, 0.6], [1, 0, 0.3, 0.3, 0.5, 0.5]],
                           dtype=torch.float64)  # rows 0 and 1 share cells
    loss_fn = YOLOv5Loss(3)
    asg = assign_yolov5(targets, [p.shape[2:4] for p in preds], loss_fn.anchors_grid)
    dup = int((~asg[1].obj_owner).sum())
    assert asg[0].num_pos > 0 and asg[1].num_pos > 0 and dup > 0  # repeated rows accumulate their gradients
    gen = torch.Generator().manual_seed(0)
    w_box = torch.randn(asg.num_pos, 4, generator=gen, dtype=torch.float64)
    w_cls = [torch.randn(a.num_pos, 3, generator=gen, dtype=torch.float64) for a in asg]

    def f(p0, p1):  # preds[2] needs no gradient
        objs, box, classes = _gather_heads([p0, p1, preds[2]], asg)
        assert [tuple(c.shape) for c in classes] == [(a.num_pos, 3) for a in asg]
        out = (box * w_box).sum() + sum((o * o).sum() for o in objs)
        return out + sum((c * w).sum() for c, w in zip(classes, w_cls))

    assert torch.autograd.gradcheck(f, (preds[0].clone().requires_grad_(True), preds[1].clone().requires_grad_(True)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_finite(dtype):
    preds, targets, _ = _random_case(dtype=torch.float64, n=8)
    big = [(p * 30).to(dtype).requires_grad_(True) for p in preds]  # saturated logits
    out = YOLOv5Loss(3, fl_gamma=1.5)(big, targets.to(dtype))
    out.total.backward()
    assert out.total.dtype == torch.float32 and torch.isfinite(out.total)
    for p in big:
        assert p.grad.dtype == dtype and torch.isfinite(p.grad).all()
    # moderate values agree with the float32 computation
    small = [p.to(dtype) for p in preds]
    ref = YOLOv5Loss(3)([p.float() for p in small], targets.to(dtype).float()).total
    got = YOLOv5Loss(3)(small, targets.to(dtype)).total
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=0)


def test_extreme_logits_finite():
    preds, targets, _ = _random_case(n=8, dtype=torch.float32)
    for scale in (1e2, 1e4):
        for sign in (1.0, -1.0):
            ps = [(torch.full_like(p, sign * scale)).requires_grad_(True) for p in preds]
            out = YOLOv5Loss(3, fl_gamma=2.0, obj_pw=2.0)(ps, targets)
            out.total.backward()
            assert torch.isfinite(out.total), (scale, sign)
            for p in ps:
                assert torch.isfinite(p.grad).all(), (scale, sign)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 12),
    nc=st.integers(1, 4),
    levels=st.sampled_from([2, 3, 5]),
)
def test_property_finite_and_stats(seed, n, nc, levels):
    img = 128 if levels == 5 else 64
    preds, targets, strides = _random_case(nc=nc, n=n, seed=seed, levels=levels, img=img)
    anchors = [(10 * s / 8, 13 * s / 8, 16 * s / 8, 30 * s / 8, 33 * s / 8, 23 * s / 8) for s in strides]
    loss_fn = YOLOv5Loss(nc, anchors=anchors, strides=strides)
    assert loss_fn.balance == default_balance(levels)
    out = loss_fn([p.requires_grad_(True) for p in preds], targets)
    out.total.backward()
    assert torch.isfinite(out.total)
    assert out.stats["num_pos"] == sum(out.stats["num_pos_per_level"])
    assert len(out.stats["num_pos_per_level"]) == levels
    iou = float(out.stats["iou_mean"])
    assert 0.0 <= iou <= 1.0
    total = sum(out.components.values()) * preds[0].shape[0]
    torch.testing.assert_close(out.total.detach(), total, rtol=1e-12, atol=1e-12)
    if out.stats["num_pos"] == 0:
        assert float(out.components["box"]) == 0.0


def test_from_hyp():
    hyp = {  # hyp.scratch-low.yaml of yolov5 v7.0, as loaded
        "lr0": 0.01, "lrf": 0.01, "momentum": 0.937, "weight_decay": 0.0005, "warmup_epochs": 3.0,
        "warmup_momentum": 0.8, "warmup_bias_lr": 0.1, "box": 0.05, "cls": 0.5, "cls_pw": 1.0,
        "obj": 1.0, "obj_pw": 1.0, "iou_t": 0.2, "anchor_t": 4.0, "fl_gamma": 0.0, "hsv_h": 0.015,
        "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0, "translate": 0.1, "scale": 0.5, "shear": 0.0,
        "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5, "mosaic": 1.0, "mixup": 0.0, "copy_paste": 0.0,
    }
    d, cfg = _load("c08_bs2_nc3_pos_weight.npz")
    hyp.update(cfg["hyp"])
    loss_fn = YOLOv5Loss.from_hyp(hyp, cfg["nc"])
    out = loss_fn([torch.from_numpy(d[f"p{i}"]) for i in range(3)], torch.from_numpy(d["targets"]))
    _close(out.total, d["loss"], what="from_hyp total")
    bad = dict(hyp)
    del bad["obj_pw"]
    with pytest.raises(ValueError, match="obj_pw"):
        YOLOv5Loss.from_hyp(bad, 3)
    with pytest.raises(TypeError, match="hyp"):
        YOLOv5Loss.from_hyp([1, 2], 3)


def test_exported_lazily():
    assert detloss.YOLOv5Loss is YOLOv5Loss


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.fixture
def case():
    preds, targets, _ = _random_case(n=4)
    return YOLOv5Loss(3), preds, targets


def test_bad_preds(case):
    loss_fn, preds, targets = case
    with pytest.raises(ValueError, match=r"preds\[1\].*5 \+ num_classes = 8.*got 9"):
        loss_fn([preds[0], torch.zeros(*preds[1].shape[:4], 9, dtype=torch.float64), preds[2]], targets)
    with pytest.raises(ValueError, match=r"preds: expected 3 levels.*got 2"):
        loss_fn(preds[:2], targets)
    with pytest.raises(ValueError, match=r"preds\[0\].*\[bs, 3, ny, nx, 8\]"):
        loss_fn([preds[0][:, :2]] + preds[1:], targets)
    with pytest.raises(ValueError, match=r"preds\[2\].*batch size"):
        loss_fn(preds[:2] + [preds[2][:1]], targets)
    with pytest.raises(TypeError, match="preds"):
        loss_fn(preds[0], targets)
    with pytest.raises(TypeError, match=r"preds\[0\].*floating"):
        loss_fn([preds[0].long()] + preds[1:], targets)
    with pytest.raises(ValueError, match="anchors"):
        YOLOv5Loss(3, strides=(8, 16))


@pytest.mark.parametrize(
    "row, value, pattern",
    [
        (2, (0, 3, 0.5, 0.5, 0.1, 0.1), r"targets: expected class < num_classes = 3, got 3 in row 2"),
        (1, (0, 1, 1.2, 0.5, 0.1, 0.1), r"targets: expected normalized coordinates.*in row 1"),
        (3, (0, 1, 0.5, 0.5, -0.1, 0.1), r"targets: expected normalized coordinates.*in row 3"),
        (0, (2, 1, 0.5, 0.5, 0.1, 0.1), r"targets: expected image index < the batch size.* = 2, got 2 in row 0"),
        (2, (0, 1, float("nan"), 0.5, 0.1, 0.1), r"targets: expected finite values, got NaN or inf in row\(s\) 2"),
        (1, (0, 1.5, 0.5, 0.5, 0.1, 0.1), r"targets: expected a non-negative integer class.*row 1"),
        (1, (-1, 1, 0.5, 0.5, 0.1, 0.1), r"targets: expected a non-negative integer image index.*row 1"),
    ],
)
def test_bad_targets(case, row, value, pattern):
    loss_fn, preds, targets = case
    targets = targets.clone()
    targets[row] = torch.tensor(value, dtype=targets.dtype)
    with pytest.raises(ValueError, match=pattern):
        loss_fn(preds, targets)


def test_bad_targets_shape_and_type(case):
    loss_fn, preds, targets = case
    with pytest.raises(ValueError, match=r"targets: expected shape \[N, 6\].*\(4, 5\)"):
        loss_fn(preds, targets[:, :5])
    with pytest.raises(TypeError, match="targets"):
        loss_fn(preds, targets.long())
    with pytest.raises(TypeError, match="targets"):
        loss_fn(preds, targets.tolist())


@pytest.mark.parametrize(
    "kw, name",
    [({"num_classes": 0}, "num_classes"), ({"anchor_t": 0.0}, "anchor_t"), ({"label_smoothing": 1.0}, "label_smoothing"),
     ({"balance": [1.0, 2.0]}, "balance"), ({"obj_pw": -1.0}, "obj_pw"), ({"box": float("nan")}, "box")],
)
def test_bad_constructor_arguments(kw, name):
    args = {"num_classes": 3, **kw}
    with pytest.raises(ValueError, match=name):
        YOLOv5Loss(**args)


class FirstWriterOwnsTheCell(YOLOv5Loss):
    """The loss with the opposite rule: the first positive of a shared cell sets its objectness."""

    def assignment(self, inputs, prepared):
        asg = super().assignment(inputs, prepared)
        for lvl in asg:
            key = ((lvl.image * self.num_anchors + lvl.anchor) * lvl.grid_size[0] + lvl.gy) * lvl.grid_size[1] + lvl.gx
            lvl.obj_owner = rank_in_group(key, descending=False) == 0
        return asg


def test_last_writer_rule_is_what_the_reference_checks():
    """With the first writer owning shared cells instead, the reference totals are missed."""
    missed = 0
    for name in CASES:
        d, cfg = _load(name)
        loss_fn = FirstWriterOwnsTheCell(
            cfg["nc"], anchors=cfg["anchors_pixels"], strides=cfg["strides"], autobalance=cfg["autobalance"],
            gr=cfg["gr"], **cfg["hyp"],
        )
        out = loss_fn([torch.from_numpy(d[f"p{i}"]) for i in range(3)], torch.from_numpy(d["targets"]))
        missed += not np.isclose(float(out.total), float(d["loss"]), rtol=1e-6, atol=0)
    assert missed > 0


@pytest.mark.parametrize("name", ["c03_bs2_nc80_many.npz", "c06_bs2_nc3_focal.npz", "c08_bs2_nc3_pos_weight.npz"])
def test_parity_through_fused_dense_losses(monkeypatch, name):
    """Every dense BCE / focal call routed through detloss.kernels (closed-form pass, eager)."""
    monkeypatch.setenv("DETLOSS_FUSED", "1")
    monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "0")
    monkeypatch.setenv("DETLOSS_COMPILE", "0")
    d, cfg = _load(name)
    preds = [torch.from_numpy(d[f"p{i}"]).clone().requires_grad_(True) for i in range(3)]
    out = _loss_from_config(cfg)(preds, torch.from_numpy(d["targets"]))
    out.total.backward()
    _close(out.total, d["loss"], what=f"{name} total (fused)")
    for i, p in enumerate(preds):
        _close(p.grad, d[f"grad_p{i}"], what=f"{name} grad p{i} (fused)")


def test_autobalance_is_a_buffer_and_a_resumed_run_continues_with_it():
    """Three calls in one run against two calls, a state_dict round trip into a fresh loss, and
    the third call: the same balance and the same loss as the reference's third call."""
    d, cfg = _load("c10_bs1_nc3_autobalance.npz")
    preds = [torch.from_numpy(d[f"p{i}"]) for i in range(3)]
    targets = torch.from_numpy(d["targets"])
    run = _loss_from_config(cfg)
    assert "level_balance" in run.state_dict()
    for _ in range(2):
        run(preds, targets)
    resumed = _loss_from_config(cfg)
    resumed.load_state_dict(run.state_dict())
    assert resumed.balance == run.balance != resumed.initial_balance
    out = resumed(preds, targets)
    assert out.stats["balance"] == run.balance
    _close(out.total, d["loss_call2"], what="resumed third call")
    # without the state the third call is the first call again
    fresh = _loss_from_config(cfg)(preds, targets)
    assert float(fresh.total) != float(out.total)


def test_assign_terms_and_stats():
    from detloss.assign.yolov5 import YOLOv5Assignment
    from detloss.losses.base import STAT_KEYS

    d, cfg = _load("c03_bs2_nc80_many.npz")
    loss_fn = _loss_from_config(cfg)
    preds = [torch.from_numpy(d[f"p{i}"]).requires_grad_(True) for i in range(3)]
    targets = torch.from_numpy(d["targets"])
    asg = loss_fn.assign(preds, targets)
    assert isinstance(asg, YOLOv5Assignment) and asg.batch_size == cfg["bs"]
    # pred_index is the cell of the flattened [bs, na, ny, nx] levels
    shapes = [p.shape[1:4] for p in preds]
    offsets = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    for i, lvl in enumerate(asg):
        sel = asg.extras["level"] == i
        _, ny, nx = shapes[i]
        want = offsets[i] + (lvl.anchor * ny + lvl.gy) * nx + lvl.gx
        assert torch.equal(asg.pred_index[sel], want) and torch.equal(asg.batch_index[sel], lvl.image)
    out = loss_fn(preds, targets)
    assert out.stats["num_pos"] == asg.num_pos > 0
    torch.testing.assert_close(sum(out.terms.values()), out.total, rtol=1e-12, atol=0)
    assert all(t.requires_grad for t in out.terms.values())
    for k, typ in STAT_KEYS.items():
        assert type(out.stats[k]) is typ, k
    assert out.stats["normalizer"] == float(asg.num_pos)


def test_decode_is_detects_inference_decoding():
    """Level 1, anchor 2, cell (y 3, x 1) of a 64 x 64 input, worked out by hand."""
    loss_fn = YOLOv5Loss(2)
    preds = [torch.zeros(1, 3, 64 // s, 64 // s, 7) for s in (8, 16, 32)]
    preds[1][0, 2, 3, 1, :4] = torch.tensor([math.log(3.0), 0.0, 0.0, math.log(3.0)])  # sigmoid 0.75, 0.5
    preds[1][0, 2, 3, 1, 5] = 20.0
    boxes, scores = loss_fn.decode(preds)
    k = 3 * 64 + 2 * 16 + 3 * 4 + 1
    cx, cy = (0.75 * 2 - 0.5 + 1) * 16, (0.5 * 2 - 0.5 + 3) * 16
    w, h = 59.0, 1.5 ** 2 * 119.0  # anchor 2 of P4: (59, 119)
    torch.testing.assert_close(boxes[0, k], torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]))
    torch.testing.assert_close(scores[0, k], torch.tensor([0.5 * torch.sigmoid(torch.tensor(20.0)).item(), 0.25]))
    assert boxes.shape == (1, 3 * (64 + 16 + 4), 4)
    one = YOLOv5Loss(1).decode([p[..., :6] for p in preds])[1]
    assert bool((one == 0.5).all())  # one class: the objectness alone


@pytest.mark.parametrize("fused", ["0", "1"])
def test_class_term_never_builds_the_one_hot_target_and_keeps_parity(monkeypatch, fused):
    """With plain BCE and no negative smoothing the class BCE compares each logit's class with its
    positive's label (kernels.fused_onehot_bce_with_logits): the reference's class loss and
    gradients on the eager (small) and the fused closed form; with label smoothing, focal loss or
    a class pos_weight the dense target is kept (those cases' parity is test_parity_float64)."""
    monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "0")
    monkeypatch.setenv("DETLOSS_FUSED", fused)
    monkeypatch.setenv("DETLOSS_COMPILE", "0")
    calls = []
    real = detloss.kernels.fused_onehot_bce_with_logits

    def spy(*args, **kw):
        calls.append(kw.get("compiled"))
        return real(*args, **kw)

    monkeypatch.setattr(detloss.kernels, "fused_onehot_bce_with_logits", spy)
    d, cfg = _load("c03_bs2_nc80_many.npz")
    preds = [torch.from_numpy(d[f"p{i}"]).clone().requires_grad_(True) for i in range(3)]
    out = _loss_from_config(cfg)(preds, torch.from_numpy(d["targets"]))
    out.total.backward()
    assert calls and all(c is (fused == "1") for c in calls)
    _close(out.components["cls"], d["lcls"], what="cls (one-hot)")
    for i, p in enumerate(preds):
        _close(p.grad, d[f"grad_p{i}"], what=f"grad p{i} (one-hot)")
    for name in ("c06_bs2_nc3_focal.npz", "c07_bs2_nc5_smoothing.npz", "c08_bs2_nc3_pos_weight.npz"):
        calls.clear()
        d, cfg = _load(name)
        _loss_from_config(cfg)([torch.from_numpy(d[f"p{i}"]) for i in range(3)], torch.from_numpy(d["targets"]))
        assert not calls, name
