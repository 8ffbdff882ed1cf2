"""detloss's rotated-box, keypoint and mask pieces against the installed ultralytics 8.4.190 functions
(run as oracles, never copied): ProbIoU with and without the variance floor, dist2rbox / rbox2dist,
xywhr2xyxyxyxy, KeypointLoss, RealNVP.log_prob (state dicts load both ways), RLELoss, crop_mask and
single_mask_loss, BCEDiceLoss; and the task criteria on random scenes where the assignment has
zero-alignment ties (the reference cases avoid them), in float64.
"""
from __future__ import annotations

import math

import pytest
import torch

import detloss.functional as F
import detloss.nn as dnn


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rboxes(n, g):
    return torch.cat((torch.rand(n, 2, generator=g) * 50, torch.rand(n, 2, generator=g) * 20 + 0.01,
                      torch.rand(n, 1, generator=g) * 3 - 1), 1)


@pytest.mark.parametrize("floor", [0.0, 0.01])
def test_probiou(floor):
    from ultralytics.utils.metrics import probiou

    g = torch.Generator().manual_seed(0)
    b1, b2 = rboxes(300, g), rboxes(300, g)
    b2[:100, :2] = b1[:100, :2] + torch.randn(100, 2, generator=g)
    x1, x2 = b1.clone().requires_grad_(True), b2.clone().requires_grad_(True)
    ref = probiou(x1, x2, floor=floor).squeeze(-1)
    ref.sum().backward()
    y1, y2 = b1.clone().requires_grad_(True), b2.clone().requires_grad_(True)
    got = F.probiou(y1, y2, floor=floor)
    got.sum().backward()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(y1.grad, x1.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y2.grad, x2.grad, rtol=1e-10, atol=1e-12)


def test_rotated_conversions():
    from ultralytics.utils.ops import xywhr2xyxyxyxy
    from ultralytics.utils.tal import dist2rbox, rbox2dist

    g = torch.Generator().manual_seed(1)
    anc = torch.rand(200, 2, generator=g) * 50
    dist = torch.rand(200, 4, generator=g) * 10
    ang = torch.rand(200, 1, generator=g) * 3 - 1
    b = rboxes(200, g)
    assert torch.equal(F.dist_to_rbox(dist, ang, anchor_points=anc), dist2rbox(dist, ang, anc))
    assert torch.equal(F.rbox_to_dist(b, anchor_points=anc), rbox2dist(b[:, :4], anc, b[:, 4:5]))
    assert torch.equal(F.rbox_to_dist(b, anchor_points=anc, max_dist=15 - 0.01), rbox2dist(b[:, :4], anc, b[:, 4:5], reg_max=15))
    assert torch.equal(F.xywhr_to_corners(b), xywhr2xyxyxyxy(b))


def test_keypoint_loss():
    from ultralytics.utils.loss import KeypointLoss
    from ultralytics.utils.metrics import OKS_SIGMA

    g = torch.Generator().manual_seed(2)
    pred = torch.randn(40, 17, 3, generator=g) * 5
    gt = pred + torch.randn(40, 17, 3, generator=g)
    vis = torch.rand(40, 17, generator=g) > 0.3
    area = torch.rand(40, 1, generator=g) * 30
    sig = torch.from_numpy(OKS_SIGMA)
    assert torch.equal(sig, F.keypoints.COCO_KEYPOINT_SIGMAS)
    p1, p2 = pred.clone().requires_grad_(True), pred.clone().requires_grad_(True)
    ref = KeypointLoss(sig)(p1, gt, vis, area)
    ref.backward()
    got = F.keypoint_loss(p2, gt, visible=vis, area=area, sigmas=sig)
    got.backward()
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    torch.testing.assert_close(p2.grad, p1.grad, rtol=0, atol=0)


def test_realnvp_and_rle():
    from ultralytics.nn.modules.block import RealNVP
    from ultralytics.utils.loss import RLELoss

    torch.manual_seed(3)
    theirs = RealNVP().double()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    ours = dnn.RealNVP(square_in_float32=True).double()
    ours.load_state_dict(theirs.state_dict())
    RealNVP().load_state_dict(dnn.RealNVP().state_dict())  # and the other way
    g = torch.Generator().manual_seed(4)
    x = torch.randn(100, 2, generator=g) * 3
    assert torch.equal(ours.log_prob(x), theirs.log_prob(x))
    pc, gc, logit = (torch.randn(60, 2, generator=g) * 3 for _ in range(3))
    w = torch.rand(60, generator=g).float()
    sigma = logit.float().sigmoid()
    err = ((pc - gc) / (sigma + 1e-9)).clamp(-100, 100)
    ref = RLELoss()(sigma, theirs.log_prob(err), err, w)
    got = F.rle_loss(pc, gc, sigma_logit=logit, log_prob=ours.log_prob, weight=w.double(), sigma_in_float32=True)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)


def test_masks():
    from ultralytics.utils.loss import BCEDiceLoss, v8SegmentationLoss
    from ultralytics.utils.ops import crop_mask

    g = torch.Generator().manual_seed(5)
    n, h, w = 30, 20, 24
    coef = torch.randn(n, 8, generator=g)
    proto = torch.randn(8, h, w, generator=g)
    tgt = (torch.rand(n, h, w, generator=g) > 0.5).double()
    c = torch.rand(n, 4, generator=g) * torch.tensor([w, h, w, h])
    boxes = torch.cat((torch.minimum(c[:, :2], c[:, 2:]), torch.maximum(c[:, :2], c[:, 2:])), 1)
    area = torch.rand(n, generator=g) + 0.01
    assert torch.equal(F.crop_mask(tgt, boxes), crop_mask(tgt.clone(), boxes))
    ref = v8SegmentationLoss.single_mask_loss(tgt, coef, proto, boxes, area)
    got = F.cropped_mask_bce(torch.einsum("in,nhw->ihw", coef, proto), tgt, boxes=boxes, area=area)
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=0)
    x = torch.randn(2, 3, 8, 8, generator=g) * 2
    y = (torch.rand(2, 3, 8, 8, generator=g) > 0.5).double()
    torch.testing.assert_close(F.bce_dice_loss(x, y), BCEDiceLoss()(x, y), rtol=1e-14, atol=0)


def _scene(task, seed, bs=2, size=128, n=6):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from detloss_bench._ultralytics import real_model, synthetic
    from detloss_bench.ultralytics_tasks import YAML

    model = real_model(YAML[task].format(f="yolov8"), task, nc=1 if task == "pose" else 3)
    model.double()
    preds, batch = synthetic(model, task, bs, size, n, seed=seed)

    def dbl(x):
        if isinstance(x, torch.Tensor):
            return x.detach().double().requires_grad_(x.requires_grad) if x.is_floating_point() else x
        if isinstance(x, (list, tuple)):
            return type(x)(dbl(v) for v in x)
        if isinstance(x, dict):
            return {k: dbl(v) for k, v in x.items()}
        return x

    # coordinates on a 1/1024 grid, as in the reference data: ultralytics' float32 keypoint targets
    # are then exact, and what is compared is the loss, not that rounding
    grid = {k: (torch.round(v * 1024) / 1024 if k in ("bboxes", "keypoints") else v) for k, v in batch.items()}
    return model, dbl(preds), {k: (v.double() if k in ("batch_idx", "cls", "bboxes") else v) for k, v in grid.items()}


@pytest.mark.parametrize("task", ["obb", "pose", "segment"])
@pytest.mark.parametrize("seed", [0, 1])
def test_criteria_with_zero_alignment_ties(task, seed):
    """Random head outputs leave boxes with fewer than 10 candidates of non-zero alignment: the
    zero-alignment positives torch.topk picks count in the pose and mask means."""
    from detloss.integrations import ultralytics as du

    model, preds, batch = _scene(task, seed)
    theirs = model.init_criterion()
    ours = {"obb": du.OBBLoss, "pose": du.PoseLoss, "segment": du.SegmentationLoss}[task](model)
    leaves = [t for t in preds.values() if isinstance(t, torch.Tensor) and t.requires_grad]
    la, ia = theirs(preds, batch)
    ga = torch.autograd.grad(la.sum(), leaves)
    lb, ib = ours(preds, batch)
    gb = torch.autograd.grad(lb.sum(), leaves)
    assert list(ia) == list(ib)
    torch.testing.assert_close(lb, la, rtol=1e-7, atol=1e-9)
    for x, y in zip(gb, ga):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7 * float(y.abs().max()))  # float32 mask BCE there
