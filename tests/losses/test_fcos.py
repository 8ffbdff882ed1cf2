"""FCOSLoss (torchvision convention) against the original torchvision FCOS loss.

Reference data: tests/data/torchvision_fcos/ (copied from the shared reference folder), whose
manifest's SOURCE line reads: "torchvision 0.29.1+cu130 with torch 2.14.1+cu130:
torchvision.ops sigmoid_focal_loss, generalized_box_iou_loss, distance_box_iou_loss,
complete_box_iou_loss, box_iou, generalized_box_iou; torchvision.models.detection.FCOS.compute_loss
(matcher) -> FCOSHead.compute_loss. Run unmodified on CPU in float64."
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import detloss
from detloss.assign.fcos import assign_fcos
from detloss.boxes import targets_to_yolo_rows
from detloss.losses.fcos import FCOSLoss

DATA = Path(__file__).resolve().parents[1] / "data" / "torchvision_fcos"
CASES = sorted(p.name for p in DATA.glob("fcos_*.npz"))
MANIFEST = json.loads((DATA / "manifest.json").read_text())
RTOL = 1e-6


def _load(name):
    d = np.load(DATA / name)
    cfg = json.loads(str(d["config"]))
    targets = [
        {"boxes": torch.from_numpy(d["gt_boxes"][i, :n]), "labels": torch.from_numpy(d["gt_labels"][i, :n])}
        for i, n in enumerate(d["gt_counts"])
    ]
    return d, cfg, targets


def _heads(d, dtype=torch.float64):
    return [
        torch.from_numpy(d[k]).to(dtype).requires_grad_()
        for k in ("cls_logits", "bbox_regression", "bbox_ctrness")
    ]


def test_manifest_lists_every_case():
    assert sorted(c["file"] for c in MANIFEST["cases"]) == CASES
    assert len(CASES) == 10


@pytest.mark.parametrize("name", CASES)
def test_parity_losses_and_gradients(name):
    d, cfg, targets = _load(name)
    heads = _heads(d)
    loss_fn = FCOSLoss(cfg["num_classes"], strides=cfg["strides"], center_sampling_radius=cfg["center_sampling_radius"])
    out = loss_fn(*heads, cfg["feature_sizes"], targets, image_size=(cfg["img_h"], cfg["img_w"]))
    for ours, ref in (("cls", "loss_classification"), ("box", "loss_bbox_regression"), ("centerness", "loss_bbox_ctrness")):
        np.testing.assert_allclose(out.components[ours].item(), d[ref], rtol=RTOL, atol=1e-12, err_msg=ours)
    total_ref = d["loss_classification"] + d["loss_bbox_regression"] + d["loss_bbox_ctrness"]
    np.testing.assert_allclose(out.total.item(), total_ref, rtol=RTOL)
    out.total.backward()
    for h, ref in zip(heads, ("grad_cls_logits", "grad_bbox_regression", "grad_bbox_ctrness")):
        np.testing.assert_allclose(h.grad.numpy(), d[ref], rtol=RTOL, atol=1e-12, err_msg=ref)
    assert out.stats["num_pos"] == int((d["matched_idxs"] >= 0).sum())
    assert sum(out.stats["num_pos_per_level"]) == out.stats["num_pos"]


@pytest.mark.parametrize("name", CASES)
def test_parity_matched_idxs(name):
    d, cfg, targets = _load(name)
    a = assign_fcos(targets, cfg["feature_sizes"], cfg["strides"], image_size=(cfg["img_h"], cfg["img_w"]))
    np.testing.assert_array_equal(torch.stack(a.matched_idxs()).numpy(), d["matched_idxs"])
    # the assignment the loss uses is the same one
    b = FCOSLoss(cfg["num_classes"]).assign(*_heads(d), cfg["feature_sizes"], targets, image_size=(cfg["img_h"], cfg["img_w"]))
    np.testing.assert_array_equal(torch.stack(b.matched_idxs()).numpy(), d["matched_idxs"])
    # its flat positives are the foreground points, with their boxes and labels
    fg = torch.from_numpy(d["matched_idxs"] >= 0)
    assert b.num_pos == int(fg.sum()) and torch.equal(b.foreground(), fg)
    for k in range(0, b.num_pos, max(1, b.num_pos // 7)):
        img, j = int(b.batch_index[k]), int(b.target_index[k])
        assert torch.equal(b.boxes[k], targets[img]["boxes"][j]) and int(b.labels[k]) == int(targets[img]["labels"][j])
    # levels and point placement: torchvision's anchors (centre, side)
    anchors = torch.from_numpy(d["anchors"][0])
    np.testing.assert_array_equal(a.grid.points.numpy(), ((anchors[:, :2] + anchors[:, 2:]) / 2).numpy())
    np.testing.assert_array_equal(a.grid.scales.numpy(), (anchors[:, 2] - anchors[:, 0]).numpy())
    counts = torch.bincount(a.levels, minlength=5).tolist()
    assert counts == cfg["num_anchors_per_level"]


def test_point_placement_without_image_size_uses_strides():
    d, cfg, targets = _load("fcos_01_bs1_nc1.npz")
    a = assign_fcos(targets, cfg["feature_sizes"], cfg["strides"])
    anchors = torch.from_numpy(d["anchors"][0])
    np.testing.assert_array_equal(a.grid.points.numpy(), ((anchors[:, :2] + anchors[:, 2:]) / 2).numpy())
    np.testing.assert_array_equal(torch.stack(a.matched_idxs()).numpy(), d["matched_idxs"])


def test_public_name_and_yolo_rows_give_the_same_loss():
    d, cfg, targets = _load("fcos_08_bs3_mixed.npz")
    size = (cfg["img_h"], cfg["img_w"])
    loss_fn = detloss.FCOSLoss(cfg["num_classes"])
    a = loss_fn(*_heads(d), cfg["feature_sizes"], targets, image_size=size)
    rows = targets_to_yolo_rows(targets, size)
    b = loss_fn(*_heads(d), cfg["feature_sizes"], rows, image_size=size)
    torch.testing.assert_close(a.total, b.total, rtol=1e-12, atol=1e-12)


def test_centerness_may_come_without_its_last_dimension():
    d, cfg, targets = _load("fcos_04_empty_image.npz")
    size = (cfg["img_h"], cfg["img_w"])
    cls, reg, ctr = _heads(d)
    a = FCOSLoss(3)(cls, reg, ctr, cfg["feature_sizes"], targets, image_size=size)
    b = FCOSLoss(3)(cls, reg, ctr.squeeze(2), cfg["feature_sizes"], targets, image_size=size)
    assert a.total.item() == b.total.item()


def test_gradcheck_float64():
    torch.manual_seed(0)
    sizes = [(2, 2), (1, 1), (1, 1), (1, 1), (1, 1)]
    p = sum(h * w for h, w in sizes)
    targets = [
        {"boxes": torch.tensor([[1.0, 1.0, 12.0, 10.0], [4.0, -5.0, 14.0, 6.0], [-3.0, 2.0, 6.0, 14.0]],
                               dtype=torch.float64), "labels": torch.tensor([0, 1, 1])},
    ]
    cls = torch.randn(1, p, 2, dtype=torch.float64, requires_grad=True)
    reg = (torch.rand(1, p, 4, dtype=torch.float64) + 0.2).requires_grad_()
    ctr = torch.randn(1, p, 1, dtype=torch.float64, requires_grad=True)
    loss_fn = FCOSLoss(2)
    assert loss_fn(cls, reg, ctr, sizes, targets).stats["num_pos"] == 3
    assert torch.autograd.gradcheck(lambda c, r, z: loss_fn(c, r, z, sizes, targets).total, (cls, reg, ctr))


# ------------------------------------------------------------------ edge cases


def _random_heads(batch, p, c, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, p, c, generator=g).to(dtype).requires_grad_(),
        (torch.rand(batch, p, 4, generator=g) * 3).to(dtype).requires_grad_(),
        torch.randn(batch, p, 1, generator=g).to(dtype).requires_grad_(),
    ]


SIZES_64 = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
P_64 = 86


def _matched(loss_fn, targets, sizes=SIZES_64):
    """``matched_idxs [B, P]`` of the assignment ``loss_fn`` uses (the heads' values do not matter)."""
    heads = _random_heads(len(targets), sum(h * w for h, w in sizes), loss_fn.num_classes)
    return torch.stack(loss_fn.assign(*heads, sizes, targets).matched_idxs())


def test_all_empty_batch_is_finite_and_box_gradients_are_zero():
    heads = _random_heads(2, P_64, 3)
    targets = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}] * 2
    out = FCOSLoss(3)(*heads, SIZES_64, targets)
    assert torch.isfinite(out.total)
    assert out.components["box"].item() == 0.0 and out.components["centerness"].item() == 0.0
    out.total.backward()
    assert torch.all(heads[1].grad == 0) and torch.all(heads[2].grad == 0)
    assert torch.isfinite(heads[0].grad).all() and heads[0].grad.abs().sum() > 0
    assert out.stats["num_pos"] == 0 and out.stats["iou_mean"] == 0.0


def test_empty_image_contributes_only_background():
    heads = _random_heads(2, P_64, 3, dtype=torch.float64)
    box = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]], dtype=torch.float64), "labels": torch.tensor([1])}
    empty = {"boxes": torch.zeros(0, 4, dtype=torch.float64), "labels": torch.zeros(0, dtype=torch.int64)}
    out = FCOSLoss(3)(*heads, SIZES_64, [box, empty])
    out.total.backward()
    assert out.stats["num_pos"] > 0
    assert torch.all(heads[1].grad[1] == 0) and torch.all(heads[2].grad[1] == 0)
    assert heads[0].grad[1].abs().sum() > 0


def test_border_tiny_and_huge_boxes_are_finite():
    heads = _random_heads(1, P_64, 2)
    boxes = torch.tensor(
        [
            [0.0, 0.0, 64.0, 64.0],  # the whole image, touching every border
            [0.0, 0.0, 10.0, 10.0],  # corner
            [30.0, 30.0, 30.0, 30.0],  # zero area
            [20.0, 20.0, 20.001, 20.002],  # tiny
            [-2e3, -2e3, 2e3, 2e3],  # far larger than the image
            [56.0, 0.0, 64.0, 64.0],  # along the right border
        ]
    )
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 1, 0, 1, 0, 1])}]
    out = FCOSLoss(2)(*heads, SIZES_64, targets)
    out.total.backward()
    assert torch.isfinite(out.total)
    assert all(torch.isfinite(h.grad).all() for h in heads)
    matched = _matched(FCOSLoss(2), targets)[0]
    assert not (matched == 2).any() and not (matched == 3).any()  # nothing can lie strictly inside
    assert (matched == 4).any()  # the huge box is regressed on the last level
    assert out.stats["num_pos"] > 0


def test_boxes_over_1e8_square_pixels_are_never_matched_as_in_torchvision():
    # torchvision scores candidates by 1e8 - area and drops scores under 1e-5
    targets = [{"boxes": torch.tensor([[-2e4, -2e4, 2e4, 2e4]], dtype=torch.float64), "labels": torch.tensor([0])}]
    assert (_matched(FCOSLoss(2), targets) == -1).all()
    targets[0]["boxes"] = targets[0]["boxes"] / 5
    assert (_matched(FCOSLoss(2), targets) == 0).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    d, cfg, targets = _load("fcos_02_bs2_nc3.npz")
    size = (cfg["img_h"], cfg["img_w"])
    loss_fn = FCOSLoss(cfg["num_classes"])
    ref_heads = [h.detach().to(dtype).to(torch.float32).requires_grad_() for h in _heads(d)]
    ref = loss_fn(*ref_heads, cfg["feature_sizes"], targets, image_size=size)
    ref.total.backward()
    heads = [h.detach().to(dtype).requires_grad_() for h in _heads(d)]
    out = loss_fn(*heads, cfg["feature_sizes"], targets, image_size=size)
    assert out.total.dtype == torch.float32
    out.total.backward()
    torch.testing.assert_close(out.total, ref.total.to(torch.float32), rtol=1e-6, atol=1e-6)
    for h, r in zip(heads, ref_heads):
        assert h.grad.dtype == dtype
        torch.testing.assert_close(h.grad, r.grad.to(dtype))
    # and close to the float64 reference
    np.testing.assert_allclose(out.components["cls"].item(), d["loss_classification"], rtol=2e-2)


def test_extreme_logits_stay_finite():
    heads = _random_heads(1, P_64, 2)
    with torch.no_grad():
        heads[0].mul_(1e4)
        heads[2].mul_(1e4)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1])}]
    out = FCOSLoss(2)(*heads, SIZES_64, targets)
    out.total.backward()
    assert torch.isfinite(out.total) and all(torch.isfinite(h.grad).all() for h in heads)


def test_inverted_predicted_boxes_are_accepted():
    # torchvision computes the GIoU of inverted predictions (negative distances) regardless
    heads = _random_heads(1, P_64, 2)
    with torch.no_grad():
        heads[1].sub_(5.0)
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1])}]
    out = FCOSLoss(2)(*heads, SIZES_64, targets)
    assert out.stats["num_pos"] > 0 and torch.isfinite(out.total)


def test_weights_scale_the_terms():
    d, cfg, targets = _load("fcos_02_bs2_nc3.npz")
    size = (cfg["img_h"], cfg["img_w"])
    a = FCOSLoss(3)(*_heads(d), cfg["feature_sizes"], targets, image_size=size)
    b = FCOSLoss(3, cls_weight=2.0, box_weight=0.5, centerness_weight=3.0)(
        *_heads(d), cfg["feature_sizes"], targets, image_size=size
    )
    for k, w in (("cls", 2.0), ("box", 0.5), ("centerness", 3.0)):
        torch.testing.assert_close(b.components[k], a.components[k] * w)
    torch.testing.assert_close(b.total, sum(b.components.values()))


# ------------------------------------------------------------------ bad input


def _ok_targets():
    return [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([1])}]


def test_bad_box_x2_lt_x1_names_the_row():
    t = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0], [30.0, 4.0, 20.0, 30.0]]), "labels": torch.tensor([0, 1])}]
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\].*x1 <= x2.*row 1"):
        FCOSLoss(2)(*_random_heads(1, P_64, 2), SIZES_64, t)


def test_bad_label_out_of_range_names_the_row():
    t = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0], [3.0, 4.0, 20.0, 30.0]]), "labels": torch.tensor([0, 2])}]
    with pytest.raises(ValueError, match=r"targets\[0\]\['labels'\].*\[0, 2\).*row 1 is 2"):
        FCOSLoss(2)(*_random_heads(1, P_64, 2), SIZES_64, t)
    t[0]["labels"] = torch.tensor([0, -1])
    with pytest.raises(ValueError, match=r"labels"):
        FCOSLoss(2)(*_random_heads(1, P_64, 2), SIZES_64, t)


def test_bad_feature_sizes():
    heads = _random_heads(1, P_64, 2)
    with pytest.raises(ValueError, match=r"feature_sizes: expected positive \(H, W\), got \(1, 0\) at level 4"):
        FCOSLoss(2)(*heads, [(8, 8), (4, 4), (2, 2), (1, 1), (1, 0)], _ok_targets())
    with pytest.raises(ValueError, match=r"feature_sizes.*86 points.*adding up to 85"):
        FCOSLoss(2)(*heads, [(8, 8), (4, 4), (3, 1), (1, 1), (1, 1)], _ok_targets())
    with pytest.raises(ValueError, match=r"feature_sizes.*86 points.*adding up to 87"):
        FCOSLoss(2)(*heads, [(8, 8), (4, 4), (2, 2), (1, 1), (1, 2)], _ok_targets())
    with pytest.raises(ValueError, match=r"feature_sizes: expected 5"):
        FCOSLoss(2)(*heads, [(8, 8), (4, 4), (2, 2)], _ok_targets())


def test_bad_head_shapes_and_types():
    cls, reg, ctr = _random_heads(1, P_64, 2)
    with pytest.raises(ValueError, match=r"cls_logits.*\[B, P, 3\]"):
        FCOSLoss(3)(cls, reg, ctr, SIZES_64, _ok_targets())
    with pytest.raises(ValueError, match=r"bbox_regression.*\(1, 86, 4\)"):
        FCOSLoss(2)(cls, reg[..., :3], ctr, SIZES_64, _ok_targets())
    with pytest.raises(ValueError, match=r"centerness"):
        FCOSLoss(2)(cls, reg, ctr[:, :5], SIZES_64, _ok_targets())
    with pytest.raises(TypeError, match=r"cls_logits.*floating"):
        FCOSLoss(2)(cls.long(), reg, ctr, SIZES_64, _ok_targets())
    with pytest.raises(ValueError, match=r"targets: expected 1 entries"):
        FCOSLoss(2)(cls, reg, ctr, SIZES_64, _ok_targets() * 2)
    with pytest.raises(TypeError, match=r"targets\[0\]\['labels'\].*integer"):
        FCOSLoss(2)(cls, reg, ctr, SIZES_64, [{"boxes": torch.zeros(1, 4), "labels": torch.zeros(1)}])
    with pytest.raises(ValueError, match=r"targets\[0\]\['boxes'\].*finite.*row 0"):
        FCOSLoss(2)(cls, reg, ctr, SIZES_64, [{"boxes": torch.tensor([[0.0, 0, float("nan"), 4]]), "labels": torch.tensor([0])}])


@pytest.mark.parametrize(
    "row, match",
    [
        ([1.0, 0.0, 0.5, 0.5, 0.2, 0.2], r"targets: expected image index < the batch size .* = 1, got 1 in row 1"),
        ([0.5, 0.0, 0.5, 0.5, 0.2, 0.2], r"targets: expected a non-negative integer image index .* in row 1"),
        ([0.0, 2.0, 0.5, 0.5, 0.2, 0.2], r"targets: expected class < num_classes = 2, got 2 in row 1"),
        ([0.0, 1.0, 0.5, 0.5, 1.5, 0.2], r"targets: expected normalized coordinates cx, cy, w, h in \[0, 1\].* in row 1"),
        ([0.0, 1.0, 1.5, 0.5, 0.2, 0.2], r"targets: expected normalized coordinates .* in row 1"),
        ([0.0, 1.0, 0.5, -0.1, 0.2, 0.2], r"targets: expected normalized coordinates .* in row 1"),
        ([0.0, 1.0, 0.5, float("nan"), 0.2, 0.2], r"targets: expected finite values, got NaN or inf in row\(s\) 1"),
    ],
    ids=["image_out_of_batch", "fractional_image", "class_out_of_range", "w_above_1", "centre_outside", "negative_cy", "nan"],
)
def test_bad_yolo_rows_are_refused_as_the_yolo_losses_refuse_them(row, match):
    cls, reg, ctr = _random_heads(1, P_64, 2)
    rows = torch.tensor([[0.0, 1.0, 0.5, 0.5, 0.2, 0.2], row])
    with pytest.raises(ValueError, match=match):
        FCOSLoss(2)(cls, reg, ctr, SIZES_64, rows, image_size=(64, 64))


def test_yolo_rows_need_an_image_size():
    cls, reg, ctr = _random_heads(1, P_64, 2)
    with pytest.raises(ValueError, match=r"image_size: required"):
        FCOSLoss(2)(cls, reg, ctr, SIZES_64, torch.tensor([[0.0, 1.0, 0.5, 0.5, 0.2, 0.2]]))


def test_float16_yolo_rows_become_pixels_in_float32():
    """float16 holds 11 significant bits: cx * 1024 rounded in float16 is up to half a pixel off.
    The rows' own float16 values are converted in float32, where these products are exact."""
    g = torch.Generator().manual_seed(0)
    n = 64
    wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
    c = wh / 2 + torch.rand(n, 2, generator=g) * (1 - wh)
    rows = torch.cat((torch.zeros(n, 1), torch.randint(0, 2, (n, 1), generator=g).float(), c, wh), 1).half()
    size = (1024, 1024)
    want = detloss.boxes.cxcywh_to_xyxy(rows[:, 2:6].double()) * 1024
    (got,) = detloss.boxes.yolo_rows_to_targets(rows, 1, size)
    assert got["boxes"].dtype == torch.float32
    assert float((got["boxes"].double() - want).abs().max()) < 1e-3
    # the loss assigns on those boxes, as it does on the same boxes given in float32 pixels
    sizes = [(128, 128), (64, 64), (32, 32), (16, 16), (8, 8)]
    heads = _random_heads(1, sum(h * w for h, w in sizes), 2)
    loss_fn = FCOSLoss(2)
    a = loss_fn.assign(*heads, sizes, rows, image_size=size)
    b = loss_fn.assign(*heads, sizes, [{"boxes": want.float(), "labels": rows[:, 1].long()}], image_size=size)
    assert a.num_pos > 0 and torch.equal(a.boxes, b.boxes)
    assert torch.equal(torch.stack(a.matched_idxs()), torch.stack(b.matched_idxs()))


@pytest.mark.parametrize("convention", ["torchvision", "mmdet"])
@pytest.mark.parametrize("targets", ["dicts", "rows"])
def test_a_batch_of_zero_images_is_a_zero_loss_with_a_graph(convention, targets):
    heads = [h[:0].detach().requires_grad_() for h in _random_heads(1, P_64, 2)]
    t = [] if targets == "dicts" else torch.zeros(0, 6)
    loss_fn = FCOSLoss(2, convention=convention)
    out = loss_fn(*heads, SIZES_64, t, image_size=(64, 64))
    assert out.total.requires_grad and float(out.total.detach()) == 0.0
    grads = torch.autograd.grad(out.total, heads)
    assert [g.shape for g in grads] == [h.shape for h in heads]
    assert out.stats["num_pos"] == out.stats["num_targets"] == 0 and out.stats["num_pos_per_level"] == [0] * 5
    assert out.stats["iou_mean"] == 0.0
    assert loss_fn.assign(*heads, SIZES_64, t, image_size=(64, 64)).num_pos == 0
    assert loss_fn.decode(*heads, SIZES_64).boxes.shape == (0, P_64, 4)


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="convention"):
        FCOSLoss(2, convention="detectron")
    with pytest.raises(ValueError, match="num_classes"):
        FCOSLoss(0)
    with pytest.raises(ValueError, match="box_loss"):
        FCOSLoss(2, box_loss="l1")
    with pytest.raises(ValueError, match="norm_on_bbox"):
        FCOSLoss(2, norm_on_bbox=True)
    with pytest.raises(ValueError, match="center_sampling_radius"):
        FCOSLoss(2, center_sampling_radius=0.0)
    with pytest.raises(ValueError, match="regress_ranges"):
        FCOSLoss(2, strides=(8, 16, 32), convention="mmdet")
    with pytest.raises(ValueError, match="anchor_sizes"):
        FCOSLoss(2, anchor_sizes=(8, 16))
