"""The DETR family beyond the reference cases: empty and crowded images, half precision, extreme
values, the matcher's optimality and bad input."""
from __future__ import annotations

import itertools
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import detloss
import detr_cases as dc
from detloss import DEIMLoss, DETRLoss, DFINELoss, HungarianMatcher, RTDETRLoss
from detloss.assign.base import Assignment

NC = 5
REG = 8


def raises(exc, *fragments):
    return pytest.raises(exc, match=".*".join(re.escape(f) for f in fragments))


def layer(g, b, q, nc, corners=False, dtype=torch.float64):
    d = {
        "pred_logits": torch.randn(b, q, nc, generator=g, dtype=dtype) * 2,
        "pred_boxes": torch.rand(b, q, 4, generator=g, dtype=dtype) * 0.5 + 0.1,
    }
    if corners:
        d["pred_corners"] = torch.randn(b, q, 4 * (REG + 1), generator=g, dtype=dtype)
        d["ref_points"] = torch.rand(b, q, 4, generator=g, dtype=dtype) * 0.5 + 0.2
    return d


def random_targets(g, counts, nc=NC, dtype=torch.float64):
    out = []
    for n in counts:
        c = torch.rand(n, 2, generator=g, dtype=dtype) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g, dtype=dtype) * 0.3 + 0.02
        out.append({"labels": torch.randint(0, nc, (n,), generator=g), "boxes": torch.cat((c, wh), 1)})
    return out


def family_outputs(kind, g, b, q, dtype=torch.float64, dn_counts=None, num_aux=2):
    """A small outputs dict of each family's layout (dn queries for the target counts given)."""
    nc = NC + 1 if kind == "detr" else NC
    corners = kind in ("dfine", "deim")
    out = layer(g, b, q, nc, corners, dtype)
    out["aux_outputs"] = [layer(g, b, q, nc, corners, dtype) for _ in range(num_aux)]
    if kind == "detr":
        return out
    if kind != "ultralytics":
        out["enc_aux_outputs"] = [layer(g, b, q, nc, False, dtype)]
        out["enc_meta"] = {"class_agnostic": False}
    if corners:
        out["pre_outputs"] = layer(g, b, q, nc, False, dtype)
        out["up"] = torch.tensor([0.5], dtype=dtype)
        out["reg_scale"] = torch.tensor([4.0], dtype=dtype)
        for a in out["aux_outputs"]:
            a["teacher_corners"], a["teacher_logits"] = out["pred_corners"], out["pred_logits"]
    if dn_counts is not None:
        groups, qdn = 2, 2 * 2 * max(max(dn_counts), 1)
        key = "dn_aux_outputs" if kind in ("rtdetrv2", "ultralytics") else "dn_outputs"
        dn = [layer(g, b, qdn, nc, corners, dtype) for _ in range(2)]
        if corners:
            for a in dn:
                a["teacher_corners"], a["teacher_logits"] = dn[-1]["pred_corners"], dn[-1]["pred_logits"]
            out["dn_pre_outputs"] = layer(g, b, qdn, nc, False, dtype)
        out[key] = dn
        pos = [torch.cat([torch.arange(n) + k * qdn // groups for k in range(groups)]) for n in dn_counts]
        if kind == "ultralytics":
            offs = [sum(dn_counts[:i]) for i in range(b)]
            out["dn_meta"] = {"dn_pos_idx": pos, "dn_gt_idx": [torch.arange(n) + o for n, o in zip(dn_counts, offs)],
                              "dn_num_group": groups, "dn_num_split": [qdn, q]}
        else:
            out["dn_meta"] = {"dn_positive_idx": pos, "dn_num_group": groups, "dn_num_split": [qdn, q]}
    return out


def make_loss(kind, **kw):
    if kind == "detr":
        return DETRLoss(NC, **kw)
    if kind in ("rtdetrv2", "ultralytics"):
        return RTDETRLoss(NC, convention=kind, **kw)
    return {"dfine": DFINELoss, "deim": DEIMLoss}[kind](NC, reg_max=REG, **kw)


KINDS = ["detr", "rtdetrv2", "ultralytics", "dfine", "deim"]


def leaves(out):
    found = []

    def walk(x):
        if isinstance(x, torch.Tensor):
            if x.requires_grad and all(x is not f for f in found):
                found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)
    walk(out)
    return found


def require_grad(out):
    for d in [out] + out.get("aux_outputs", []) + out.get("enc_aux_outputs", []) + out.get("dn_aux_outputs", []) \
            + out.get("dn_outputs", []) + [out[k] for k in ("pre_outputs", "dn_pre_outputs") if k in out]:
        for k in ("pred_logits", "pred_boxes", "pred_corners"):
            if k in d and not d[k].requires_grad:
                d[k].requires_grad_(True)
    return out


# ---------------------------------------------------------------------- empty and crowded images
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), counts=st.lists(st.integers(0, 9), min_size=1, max_size=3),
       seed=st.integers(0, 2**16), dn=st.booleans())
def test_any_target_counts_give_finite_losses_and_gradients(kind, counts, seed, dn):
    g = torch.Generator().manual_seed(seed)
    q = 6  # fewer queries than targets in some images
    out = require_grad(family_outputs(kind, g, len(counts), q, dn_counts=counts if dn and kind != "detr" else None))
    res = make_loss(kind)(out, random_targets(g, counts))
    assert torch.isfinite(res.total)
    grads = torch.autograd.grad(res.total, leaves(out), allow_unused=True)
    assert all(gr is None or torch.isfinite(gr).all() for gr in grads)
    assert res.stats["num_pos"] == sum(min(n, q) for n in counts)
    assert res.stats["num_targets"] == sum(counts)
    assert res.stats["normalizer"] == max(sum(counts), 1)
    assert all(torch.isfinite(v) for v in res.components.values())


def test_more_targets_than_queries_match_every_query_and_count_every_target():
    g = torch.Generator().manual_seed(1)
    out = require_grad(family_outputs("detr", g, 1, 4))
    res = DETRLoss(NC)(out, random_targets(g, [9]))
    asg = res.stats["assignments"]["main"]
    assert sorted(asg.pred_index.tolist()) == [0, 1, 2, 3]
    assert len(set(asg.target_index.tolist())) == 4
    assert res.stats["normalizer"] == 9.0


def test_all_empty_batch_trains_only_the_no_object_class():
    g = torch.Generator().manual_seed(2)
    out = require_grad(family_outputs("detr", g, 2, 5))
    res = DETRLoss(NC)(out, random_targets(g, [0, 0]))
    assert res.stats["num_pos"] == 0 and res.stats["normalizer"] == 1.0
    assert float(res.components["loss_bbox"]) == float(res.components["loss_giou"]) == 0.0
    assert float(res.components["class_error"]) == 100.0  # DETR's accuracy() of nothing is 0
    gb, gl = torch.autograd.grad(res.total, [out["pred_boxes"], out["pred_logits"]])
    assert float(gb.abs().max()) == 0.0 and float(gl.abs().max()) > 0


# ---------------------------------------------------------------------- precision
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["detr_basic", "rtv2_basic", "ultra_basic", "dfine_basic", "deim_mal"])
def test_half_precision_is_computed_in_float32(name, dtype):
    arrays, cfg = dc.load(name)
    half, half_leaves = dc.outputs(arrays, cfg, dtype=dtype)
    # the same (rounded) numbers in float32
    as32 = {k: v.to(dtype).float() for k, v in arrays.items() if k.startswith("out.")}
    full, full_leaves = dc.outputs({**arrays, **as32}, cfg, dtype=torch.float32)
    tgt = dc.targets(arrays, cfg)
    res_h = dc.build_loss(cfg)(half, tgt)
    res_f = dc.build_loss(cfg)(full, tgt)
    assert res_h.total.dtype == torch.float32
    torch.testing.assert_close(res_h.total, res_f.total, rtol=1e-6, atol=1e-6)
    gh = torch.autograd.grad(res_h.total, list(half_leaves.values()), allow_unused=True)
    gf = torch.autograd.grad(res_f.total, list(full_leaves.values()), allow_unused=True)
    for a, b in zip(gh, gf):
        if a is None:
            assert b is None or float(b.abs().max()) == 0
            continue
        assert a.dtype == dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a.float(), b.to(dtype).float(), rtol=1e-2, atol=1e-3)


def test_matching_costs_are_float32_for_half_inputs():
    g = torch.Generator().manual_seed(3)
    out = family_outputs("detr", g, 2, 7, dtype=torch.float16)
    asg = HungarianMatcher(1, 5, 2).assign(out, random_targets(g, [3, 2], dtype=torch.float16))
    assert all(c.dtype == torch.float32 for c in asg.extras["cost"])


@pytest.mark.parametrize("kind", KINDS)
def test_extreme_logits_and_degenerate_boxes_stay_finite(kind):
    g = torch.Generator().manual_seed(4)
    out = family_outputs(kind, g, 2, 6, dn_counts=None if kind == "detr" else [2, 3])
    for d in [out] + out["aux_outputs"]:
        d["pred_logits"][0, :2] = 1e4
        d["pred_logits"][1, :2] = -1e4
        d["pred_boxes"][0, 0, 2:] = 0.0  # a point
    tgt = random_targets(g, [2, 3])
    tgt[1]["boxes"][0, 2:] = 0.0  # a zero-area target
    out = require_grad(out)
    res = make_loss(kind)(out, tgt)
    assert torch.isfinite(res.total)
    assert all(gr is None or torch.isfinite(gr).all()
               for gr in torch.autograd.grad(res.total, leaves(out), allow_unused=True))


# ---------------------------------------------------------------------- the matcher
@settings(max_examples=40, deadline=None)
@given(q=st.integers(1, 5), n=st.integers(0, 4), seed=st.integers(0, 2**16), focal=st.booleans(),
       convention=st.sampled_from(["detr", "ultralytics"]))
def test_matching_is_a_least_cost_one_to_one_assignment(q, n, seed, focal, convention):
    g = torch.Generator().manual_seed(seed)
    out = layer(g, 1, q, NC)
    tgt = random_targets(g, [n])
    m = HungarianMatcher(2, 5, 2, use_focal=focal, convention=convention)
    (qi, ti), = m(out, tgt)
    cost = m.cost_terms(out, tgt)[0]["total"]
    k = min(q, n)
    assert qi.numel() == ti.numel() == k and len(set(qi.tolist())) == len(set(ti.tolist())) == k
    if k == 0:
        return
    best = min(  # brute force over every injective assignment of the smaller side
        sum(float(cost[i, j]) for i, j in (zip(rows, range(n)) if q >= n else zip(range(q), rows)))
        for rows in itertools.permutations(range(max(q, n)), k)
    )
    assert float(cost[qi, ti].sum()) <= best + 1e-12


def test_matcher_returns_detr_pairs_and_an_assignment():
    g = torch.Generator().manual_seed(5)
    out = layer(g, 2, 6, NC)
    tgt = random_targets(g, [3, 0])
    m = HungarianMatcher(1, 5, 2)
    pairs = m(out, tgt)
    assert [len(p[0]) for p in pairs] == [3, 0] and all(p[0].dtype == torch.int64 for p in pairs)
    asg = m.assign(out, tgt)
    assert isinstance(asg, Assignment) and asg.num_pos == 3 and asg.num_preds == 6
    torch.testing.assert_close(asg.boxes, tgt[0]["boxes"][pairs[0][1]])
    assert asg.matched_idxs()[0][pairs[0][0]].tolist() == pairs[0][1].tolist()
    terms = m.cost_terms(out, tgt)
    assert set(terms[0]) == {"class", "bbox", "giou", "total"} and terms[1]["total"].shape == (6, 0)
    torch.testing.assert_close(terms[0]["total"], terms[0]["bbox"] * 5 + terms[0]["class"] + terms[0]["giou"] * 2)


def test_non_finite_costs_raise_or_are_repaired_as_ultralytics_does():
    g = torch.Generator().manual_seed(6)
    out = layer(g, 1, 4, NC)
    out["pred_logits"][0, 2, 1] = float("nan")
    tgt = random_targets(g, [2])
    tgt[0]["labels"][:] = 1
    with raises(ValueError, "matching costs", "image 0, query 2", "NaN or inf"):
        HungarianMatcher(use_focal=True)(out, tgt)
    m = HungarianMatcher(2, 5, 2, use_focal=True, convention="ultralytics")
    (qi, ti), = m(out, tgt)  # the NaN entries cost 0 (ultralytics' repair)
    assert m.assign(out, tgt).extras["cost"][0][2].tolist() == [0.0, 0.0] and qi.numel() == 2


def test_matcher_bad_input():
    g = torch.Generator().manual_seed(7)
    out = layer(g, 2, 4, NC)
    tgt = random_targets(g, [1, 1])
    with raises(ValueError, "cost_class, cost_bbox, cost_giou", "all 0"):
        HungarianMatcher(0, 0, 0)
    with raises(ValueError, "convention", "'mmdet'"):
        HungarianMatcher(convention="mmdet")
    with raises(ValueError, "cost_bbox", "finite"):
        HungarianMatcher(cost_bbox=float("inf"))
    with raises(TypeError, "outputs", "pred_boxes"):
        HungarianMatcher()({"pred_logits": out["pred_logits"]}, tgt)
    with raises(ValueError, "outputs['pred_boxes']", "(2, 4, 4)", "(2, 3, 4)"):
        HungarianMatcher()({"pred_logits": out["pred_logits"], "pred_boxes": out["pred_boxes"][:, :3]}, tgt)
    neg = dict(out, pred_boxes=out["pred_boxes"].clone())
    neg["pred_boxes"][1, 2, 3] = -0.1
    with raises(ValueError, "outputs['pred_boxes']", "w >= 0 and h >= 0", "(1, 2)"):
        HungarianMatcher()(neg, tgt)
    assert HungarianMatcher(clamp_sizes=True)(neg, tgt)  # D-FINE's clamp
    with raises(ValueError, "targets", "one dict per image (2)", "1"):
        HungarianMatcher()(out, tgt[:1])
    with raises(ValueError, "targets", "labels below the number of logits 5", "7"):
        HungarianMatcher()(out, [tgt[0], {"labels": torch.tensor([7]), "boxes": tgt[1]["boxes"]}])


# ---------------------------------------------------------------------- bad input to the losses
def test_loss_bad_outputs():
    g = torch.Generator().manual_seed(8)
    out = family_outputs("rtdetrv2", g, 2, 5, dn_counts=[1, 2])
    tgt = random_targets(g, [1, 2])
    loss = RTDETRLoss(NC)
    with raises(TypeError, "outputs", "dict"):
        loss([out["pred_logits"]], tgt)
    with raises(ValueError, "outputs['pred_logits']", f"[2, Q, {NC}]", "(2, 5, 7)"):
        loss(dict(out, pred_logits=torch.zeros(2, 5, 7, dtype=torch.float64)), tgt)
    with raises(ValueError, "outputs['aux_outputs'][1]['pred_logits']", "[2, Q, 5]", "(1, 5, 5)"):
        loss(dict(out, aux_outputs=[out["aux_outputs"][0], layer(g, 1, 5, NC)]), tgt)
    with raises(ValueError, "outputs['aux_outputs'][0]['pred_logits']", "5 queries", "4"):
        loss(dict(out, aux_outputs=[layer(g, 2, 4, NC)]), tgt)
    with raises(TypeError, "outputs['aux_outputs']", "list of layer dicts"):
        loss(dict(out, aux_outputs=out["aux_outputs"][0]), tgt)
    bad = dict(out, pred_boxes=out["pred_boxes"].clone())
    bad["pred_boxes"][1, 3, 0] = float("nan")
    with raises(ValueError, "outputs['pred_boxes']", "finite", "(1, 3, 0)"):
        loss(bad, tgt)
    bad["pred_boxes"][1, 3, 0] = 0.5
    bad["pred_boxes"][0, 1, 2] = -0.2
    with raises(ValueError, "outputs['pred_boxes']", "w >= 0 and h >= 0", "(0, 1)"):
        loss(bad, tgt)
    with raises(ValueError, "dn_meta", "dn_aux_outputs"):
        loss({k: v for k, v in out.items() if k != "dn_meta"}, tgt)
    meta = dict(out["dn_meta"], dn_positive_idx=[out["dn_meta"]["dn_positive_idx"][0], torch.arange(3)])
    with raises(ValueError, "outputs['dn_meta']['dn_positive_idx'][1]", "4 denoising queries (2 targets x 2 groups)", "3"):
        loss(dict(out, dn_meta=meta), tgt)
    with raises(ValueError, "class_agnostic", "not supported"):
        loss(dict(out, enc_meta={"class_agnostic": True}), tgt)
    with raises(ValueError, "dn_num_group", "int >= 0", "-1"):
        loss(dict(out, dn_meta=dict(out["dn_meta"], dn_num_group=-1)), tgt)


def test_loss_bad_targets():
    g = torch.Generator().manual_seed(9)
    out = family_outputs("detr", g, 2, 5)
    tgt = random_targets(g, [1, 2])
    loss = DETRLoss(NC)
    with raises(TypeError, "targets", "list of 2 dicts"):
        loss(out, {"labels": tgt[0]["labels"], "boxes": tgt[0]["boxes"]})
    with raises(ValueError, "targets", "one dict per image (2)", "3"):
        loss(out, tgt + tgt[:1])
    with raises(TypeError, "targets[1]", "'labels' and 'boxes'", "['boxes']"):
        loss(out, [tgt[0], {"boxes": tgt[1]["boxes"]}])
    with raises(TypeError, "targets[0]['labels']", "integer tensor [n]", "torch.float32"):
        loss(out, [{"labels": torch.zeros(1), "boxes": tgt[0]["boxes"]}, tgt[1]])
    with raises(ValueError, "targets[1]['boxes']", "[2, 4]", "(2, 5)"):
        loss(out, [tgt[0], {"labels": tgt[1]["labels"], "boxes": torch.zeros(2, 5, dtype=torch.float64)}])
    with raises(ValueError, "targets[1]['labels']", f"[0, {NC})", "9 at 1"):
        loss(out, [tgt[0], {"labels": torch.tensor([0, 9]), "boxes": tgt[1]["boxes"]}])
    nan = tgt[1]["boxes"].clone()
    nan[1, 0] = float("inf")
    with raises(ValueError, "targets[1]['boxes']", "finite cxcywh boxes", "at row 1"):
        loss(out, [tgt[0], {"labels": tgt[1]["labels"], "boxes": nan}])


def test_loss_bad_options():
    with raises(ValueError, "num_classes", "int >= 1", "0"):
        DETRLoss(0)
    with raises(ValueError, "losses", "['labels', 'boxes', 'cardinality']", "'masks'"):
        DETRLoss(NC, losses=["labels", "masks"])
    with raises(ValueError, "weight_dict", "'loss_vfl'"):
        DETRLoss(NC, weight_dict={"loss_vfl": 1.0})
    with raises(ValueError, "weight_dict['loss_bbox']", "non-negative", "-1"):
        RTDETRLoss(NC, weight_dict={"loss_vfl": 1, "loss_bbox": -1})
    with raises(ValueError, "convention", "'yolo'"):
        RTDETRLoss(NC, convention="yolo")
    with raises(ValueError, "weight_dict", "convention='rtdetrv2'"):
        RTDETRLoss(NC, convention="ultralytics", weight_dict={"loss_vfl": 1})
    with raises(ValueError, "loss_gain", "'class', 'bbox', 'giou'"):
        RTDETRLoss(NC, convention="ultralytics", loss_gain={"class": 1})
    with raises(ValueError, "boxes_weight_format", "'area'"):
        RTDETRLoss(NC, boxes_weight_format="area")
    with raises(TypeError, "matcher", "HungarianMatcher"):
        DETRLoss(NC, matcher=lambda o, t: None)
    with raises(ValueError, "reg_max", "even int >= 4", "7"):
        DFINELoss(NC, reg_max=7)


def test_dfine_bad_corners_and_scales():
    g = torch.Generator().manual_seed(10)
    out = family_outputs("dfine", g, 2, 5, dn_counts=[1, 1])
    tgt = random_targets(g, [1, 1])
    loss = DFINELoss(NC, reg_max=REG)
    with raises(ValueError, "pred_corners", f"(2, 5, {4 * (REG + 1)})", "(2, 5, 12)"):
        loss(dict(out, pred_corners=torch.zeros(2, 5, 12, dtype=torch.float64)), tgt)
    with raises(ValueError, "'up' and 'reg_scale'"):
        loss({k: v for k, v in out.items() if k != "up"}, tgt)


def test_every_family_is_in_the_registry_and_the_package():
    from detloss.losses.registry import LOSSES

    for name, cls in (("detr", DETRLoss), ("rtdetr", RTDETRLoss), ("dfine", DFINELoss), ("deim", DEIMLoss)):
        assert LOSSES[name] is cls and getattr(detloss, cls.__name__) is cls and cls.name == name
    assert detloss.HungarianMatcher is HungarianMatcher


@pytest.mark.parametrize("kind", KINDS)
def test_registry_shape_stats_terms_and_assignment(kind):
    from detloss.losses.base import STAT_KEYS

    g = torch.Generator().manual_seed(12)
    out = require_grad(family_outputs(kind, g, 2, 5, dn_counts=None if kind == "detr" else [2, 1]))
    tgt = random_targets(g, [2, 1])
    loss = make_loss(kind)
    res = loss(out, tgt)
    for key, typ in STAT_KEYS.items():
        assert type(res.stats[key]) is typ, key
    assert res.stats["num_targets"] == 3 and 0.0 <= res.stats["iou_mean"] <= 1.0
    torch.testing.assert_close(sum(res.terms.values()), res.total, rtol=1e-9, atol=1e-12)
    assert set(res.terms) <= set(res.components) and all(not v.requires_grad for v in res.components.values())
    assert {loss.base_key(k) for k in res.terms} <= set(loss.term_methods)
    asg = loss.assign(out, tgt)
    assert isinstance(asg, Assignment) and asg.num_pos == res.stats["num_pos"] == 3
    assert set(asg.extras["layers"]) >= {"main", "aux_0"}


@pytest.mark.parametrize("kind", KINDS)
def test_decode_gives_pixel_boxes_and_scores(kind):
    g = torch.Generator().manual_seed(11)
    out = family_outputs(kind, g, 2, 5)
    dec = make_loss(kind).decode(out, image_size=(100, 200))
    assert dec.boxes.shape == (2, 5, 4) and dec.scores.shape == (2, 5, NC)
    assert bool((dec.scores >= 0).all() and (dec.scores <= 1).all())
    cx = out["pred_boxes"][..., 0] * 200
    torch.testing.assert_close((dec.boxes[..., 0] + dec.boxes[..., 2]) / 2, cx)


def test_ultralytics_outputs_from_stacked_layers():
    # ultralytics' stacked tensors -> the dict of convention="ultralytics": the same loss and
    # gradients as indexing every layer, through one unbind per stacked tensor
    g = torch.Generator().manual_seed(21)
    ref = family_outputs("ultralytics", g, 2, 4, dn_counts=[2, 1], num_aux=2)
    tgt = random_targets(g, [2, 1])
    lay = ref["aux_outputs"] + [{"pred_logits": ref["pred_logits"], "pred_boxes": ref["pred_boxes"]}]
    dec_b = torch.stack([d["pred_boxes"] for d in lay]).requires_grad_()
    dec_s = torch.stack([d["pred_logits"] for d in lay]).requires_grad_()
    dn_b = torch.stack([d["pred_boxes"] for d in ref["dn_aux_outputs"]]).requires_grad_()
    dn_s = torch.stack([d["pred_logits"] for d in ref["dn_aux_outputs"]]).requires_grad_()
    loss_fn = make_loss("ultralytics")
    out = RTDETRLoss.ultralytics_outputs(dec_b, dec_s, dn_b, dn_s, ref["dn_meta"])
    assert "Unbind" in out["pred_logits"].grad_fn.name() and len(out["aux_outputs"]) == 2
    got = loss_fn(out, tgt)
    indexed = {"pred_logits": dec_s[-1], "pred_boxes": dec_b[-1],
               "aux_outputs": [{"pred_logits": dec_s[i], "pred_boxes": dec_b[i]} for i in range(2)],
               "dn_aux_outputs": [{"pred_logits": dn_s[i], "pred_boxes": dn_b[i]} for i in range(2)],
               "dn_meta": ref["dn_meta"]}
    want = loss_fn(indexed, tgt)
    for k in want.components:
        torch.testing.assert_close(got.components[k], want.components[k], rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(got.total, (dec_b, dec_s, dn_b, dn_s))
    wants = torch.autograd.grad(want.total, (dec_b, dec_s, dn_b, dn_s))
    for a, b in zip(grads, wants):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    without_dn = RTDETRLoss.ultralytics_outputs(dec_b, dec_s)
    assert "dn_aux_outputs" not in without_dn and "dn_meta" not in without_dn


def test_ultralytics_outputs_rejects_bad_stacks():
    b, s = torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, NC)
    with raises(ValueError, "dec_scores", "[L, B, Q, .]", "(2, 4, 5)"):
        RTDETRLoss.ultralytics_outputs(b, s[0])
    with raises(ValueError, "dec_bboxes, dec_scores", "3 and 2"):
        RTDETRLoss.ultralytics_outputs(b, s[:2])
    with raises(ValueError, "dn_bboxes, dn_scores", "both or neither"):
        RTDETRLoss.ultralytics_outputs(b, s, b)
