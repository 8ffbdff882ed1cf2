"""The DETR family against its originals, case by case: total, every loss-dict entry by name,
the gradient of the total w.r.t. every outputs tensor, and every matcher call's pairs.

Reference data: tests/data/detr_family/ (copied from the shared reference folder), whose
manifest's SOURCE reads: facebookresearch/detr 29901c51d7fe8712168b8d0d64351170bc0f83e0
(models/matcher.py, models/detr.py SetCriterion, util/box_ops.py, util/misc.py);
lyuwenyu/RT-DETR 068dfde65f2667ad6555883c69d73de886518cad (rtdetrv2_pytorch/src/zoo/rtdetr/
rtdetrv2_criterion.py, matcher.py, denoising.py, box_ops.py, utils.py); Peterande/D-FINE
4a1f73a8bcfac736a88abde9596d87f116d780a7 (src/zoo/dfine/dfine_criterion.py, matcher.py,
denoising.py, dfine_utils.py, box_ops.py, utils.py); ShihuaHuang95/DEIM
a9aa4adce6b5e97b2a6ca9452bf01b7c35440913 (engine/deim/deim_criterion.py, matcher.py, ...);
ultralytics (pip) 8.4.190 (ultralytics/models/utils/loss.py, models/utils/ops.py, utils/loss.py
FocalLoss / VarifocalLoss, utils/metrics.py bbox_iou); generated with torch 2.14.1, scipy 1.17.1,
the originals run unmodified (registry / dist helpers stubbed).

Tolerances: float64 cases 1e-6 relative; the float32 cases (the ultralytics, D-FINE and DEIM
originals cannot run in float64) 2e-4 relative, gradients relative to their largest entry. Where
the manifest marks exact cost ties, the pairs may be any assignment of the same total cost and
the gradient rows of duplicated queries are compared as sums.
"""
from __future__ import annotations

import pytest
import torch

import detr_cases as dc

ALL = list(dc.CASES)


def tolerance(cfg):
    return 1e-6 if cfg["dtype"] == "float64" else 2e-4


def run(name):
    arrays, cfg = dc.load(name)
    out, leaves = dc.outputs(arrays, cfg)
    loss_fn = dc.build_loss(cfg)
    res = loss_fn(out, dc.targets(arrays, cfg))
    res.total.backward()
    return arrays, cfg, res, leaves, loss_fn


@pytest.mark.parametrize("name", ALL)
def test_total_and_every_component(name):
    arrays, cfg, res, _, _ = run(name)
    tol = tolerance(cfg)
    expected = {k[5:]: v for k, v in arrays.items() if k.startswith("loss.")}
    assert set(res.components) == set(expected) == set(cfg["loss_keys"])
    total = float(arrays["total"])
    assert abs(float(res.total.detach()) - total) <= tol * abs(total)
    for k, v in expected.items():
        got = res.components[k].double()
        assert got.shape == () and not got.requires_grad
        assert abs(float(got) - float(v)) <= tol * max(abs(float(v)), 1e-3 * abs(total)), k
    # the graph-connected terms sum to the total
    assert abs(float(sum(res.terms.values()).detach()) - float(res.total.detach())) <= 1e-12 + 1e-6 * abs(total)


def _tie_rows(cfg):
    """{tensor path: [(image, [queries])]} of the duplicated query rows."""
    rows = {}
    for g in cfg["tie_groups"]:
        for t in g["tensors"]:
            rows.setdefault(t, []).append((g["image"], g["queries"]))
    return rows


def _ultralytics_rows(path):
    return {"pred_logits": "dec_scores", "pred_boxes": "dec_bboxes"}.get(path, path)


@pytest.mark.parametrize("name", ALL)
def test_gradients_of_the_total(name):
    arrays, cfg, _, leaves, _ = run(name)
    tol = tolerance(cfg)
    assert set(leaves) == set(cfg["grad_keys"])
    ties = _tie_rows(cfg)
    for path, leaf in leaves.items():
        ref = arrays["grad." + path]
        got = leaf.grad if leaf.grad is not None else torch.zeros_like(ref)
        assert got.dtype == ref.dtype and got.shape == ref.shape, path
        if ref.numel() == 0:
            continue
        got, ref = got.double().clone(), ref.double().clone()
        for img, queries in ties.get(path, []):
            # which duplicate takes the target is arbitrary: compare the rows' sum
            got[img, queries[0]] = got[img, queries].sum(0)
            ref[img, queries[0]] = ref[img, queries].sum(0)
            got[img, queries[1:]] = 0
            ref[img, queries[1:]] = 0
        scale = ref.abs().max().clamp(min=1e-30)
        err = float((got - ref).abs().max() / scale)
        assert err <= tol, f"{path}: {err:.2e}"


@pytest.mark.parametrize("name", ALL)
def test_every_matching(name):
    arrays, cfg, res, _, _ = run(name)
    layers = res.stats["assignments"]
    for tag in cfg["match_tags"]:
        for b in range(cfg["num_images"]):
            ref = arrays[f"match.{tag}.{b}"]
            asg = layers[tag]
            sel = asg.batch_index == b
            got = torch.stack((asg.pred_index[sel], asg.target_index[sel])).cpu()
            assert got.shape == ref.shape, (tag, b)
            pairs_got = set(map(tuple, got.T.tolist()))
            pairs_ref = set(map(tuple, ref.T.tolist()))
            if not cfg["ties"] or tag == "go":
                assert pairs_got == pairs_ref, (tag, b)
                continue
            # ties: one-to-one, and the same total cost on the original's cost matrix
            cost = arrays[f"cost.{tag}.{b}"]
            assert len(set(got[0].tolist())) == len(set(got[1].tolist())) == got.shape[1]
            total_got = float(cost[got[0], got[1]].sum())
            total_ref = float(cost[ref[0], ref[1]].sum())
            assert abs(total_got - total_ref) <= 1e-12 * max(1.0, abs(total_ref)), (tag, b)


@pytest.mark.parametrize("name", [n for n in ALL if n.startswith(("detr", "rtv2", "ultra"))] + ["dfine_basic", "deim_mal"])
def test_matcher_alone_gives_the_cost_matrices_and_pairs(name):
    arrays, cfg = dc.load(name)
    out, _ = dc.outputs(arrays, cfg)
    loss_fn = dc.build_loss(cfg)
    tgt = dc.targets(arrays, cfg)
    for tag, layer in dc.layer_outputs(out, cfg).items():
        if f"cost.{tag}.0" not in arrays:
            continue
        indices = loss_fn.matcher(layer, tgt)
        asg = loss_fn.matcher.assign(layer, tgt)
        rtol = 1e-12 if cfg["dtype"] == "float64" else 1e-6
        for b, (qi, ti) in enumerate(indices):
            assert qi.dtype == ti.dtype == torch.int64
            ref = arrays[f"cost.{tag}.{b}"]
            torch.testing.assert_close(asg.extras["cost"][b].double(), ref, rtol=rtol, atol=rtol)
            if not cfg["ties"]:
                assert set(zip(qi.tolist(), ti.tolist())) == dc.matches(arrays, tag, cfg["num_images"])[b]
