"""YOLOv3Loss(flavor="pytorch-yolov3"): eriklindernoren/PyTorch-YOLOv3 d1041e0's YOLOLayer loss.

Checked against :func:`layer_by_rules`, written here from the rules the module docstring of
detloss.losses.yolov3 states (one truth at a time, the object / no-object cells in Python sets,
then the means of squared errors and binary cross-entropies over them), on random cases with
several layers and truths sharing a cell; the box_scale="2-wh" variant against a case derived by hand; gradcheck in
float64; non-square grids by axis symmetry; empty targets; half precision. Parity with the
original's recorded outputs is in test_yolov3_reference.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from detloss import YOLOv3Loss
from detloss.assign.darknet import assign_pytorch_yolov3

ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
MASKS = ((6, 7, 8), (3, 4, 5), (0, 1, 2))


def layer_by_rules(x, targets, anchors, img_dim, nc, ignore_thres=0.5, obj_scale=1.0, noobj_scale=100.0):
    """One layer's loss from the rules, for a square grid of ``g`` cells (``x`` raw ``[B, 3 (5 + C), g, g]``).

    Each truth takes, among the layer's three anchors (in cells: pixels / (img / g)), the one of
    largest width-height IoU ``min(w) min(h) / (a_w a_h + 1e-16 + w h - min(w) min(h))`` (the
    first on ties), in cell ``(int(cy g), int(cx g))``: that cell and anchor is an object cell (a
    later truth there overwrites its box targets; its classes are the union of its truths'), and
    that cell leaves the no-object set for this anchor and for every anchor whose wh-IoU with the
    truth exceeds ``ignore_thres``. Targets: ``x~ = cx g - floor(cx g)`` (likewise y), ``w~ =
    log(w g / a_w + 1e-16)``. Loss: the means over the object cells of the squared errors of
    ``sigmoid(t_x)``, ``sigmoid(t_y)``, ``t_w``, ``t_h``; ``obj_scale`` times the mean BCE of the
    object cells' confidence against 1, ``noobj_scale`` times the no-object cells' against 0, and
    the mean BCE of the object cells' class probabilities. Returns the loss and the mean
    confidence of the object and the no-object cells.
    """
    nb, g = x.shape[0], x.shape[2]
    pred = x.view(nb, 3, 5 + nc, g, g)
    stride = img_dim / g
    scaled = torch.tensor([(aw / stride, ah / stride) for aw, ah in anchors], dtype=torch.float32)
    cell_xywh = targets[:, 2:6] * g  # float32, as the truths are scaled
    owner, classes, not_noobj = {}, {}, set()
    for row in range(targets.shape[0]):
        b, c = int(targets[row, 0]), int(targets[row, 1])
        gx, gy, gw, gh = cell_xywh[row]
        inter = torch.minimum(scaled[:, 0], gw) * torch.minimum(scaled[:, 1], gh)
        ious = inter / ((scaled[:, 0] * scaled[:, 1] + 1e-16) + gw * gh - inter)
        best = max(range(3), key=lambda k: (float(ious[k]), -k))
        key = (b, best, int(gy), int(gx))
        owner[key] = row
        classes.setdefault(key, set()).add(c)
        not_noobj.add(key)
        not_noobj.update((b, k, int(gy), int(gx)) for k in range(3) if float(ious[k]) > ignore_thres)
    keys = sorted(owner)
    b, a, j, i = (torch.tensor([k[n] for k in keys], dtype=torch.long) for n in range(4))
    rows = torch.tensor([owner[k] for k in keys], dtype=torch.long)
    t = cell_xywh[rows]
    tx, ty = t[:, 0] - t[:, 0].floor(), t[:, 1] - t[:, 1].floor()
    tw, th = torch.log(t[:, 2] / scaled[a, 0] + 1e-16), torch.log(t[:, 3] / scaled[a, 1] + 1e-16)
    tcls = torch.zeros(len(keys), nc)
    for n, k in enumerate(keys):
        tcls[n, sorted(classes[k])] = 1.0
    p = pred[b, a, :, j, i]  # [n_obj, 5 + C]
    conf = torch.sigmoid(pred[:, :, 4])
    noobj = torch.ones(nb, 3, g, g, dtype=torch.bool)
    for k in not_noobj:
        noobj[k] = False
    bce = torch.nn.functional.binary_cross_entropy
    ones, zeros = torch.ones(len(keys)), torch.zeros(int(noobj.sum()))
    loss = (
        ((torch.sigmoid(p[:, 0]) - tx) ** 2).mean() + ((torch.sigmoid(p[:, 1]) - ty) ** 2).mean()
        + ((p[:, 2] - tw) ** 2).mean() + ((p[:, 3] - th) ** 2).mean()
        + obj_scale * bce(conf[b, a, j, i], ones) + noobj_scale * bce(conf[noobj], zeros)
        + bce(torch.sigmoid(p[:, 5:]), tcls)
    )
    return loss, float(conf[b, a, j, i].mean().detach()), float(conf[noobj].mean().detach())


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), batch=st.integers(1, 3), nc=st.integers(1, 4),
       img=st.sampled_from([64, 96, 128]), per_image=st.integers(1, 5), shared=st.booleans(),
       noobj_scale=st.sampled_from([1.0, 100.0]))
def test_matches_the_rules(seed, batch, nc, img, per_image, shared, noobj_scale):
    rng = np.random.default_rng(seed)
    rows = []
    for b in range(batch):
        for _ in range(per_image):
            rows.append([b, rng.integers(nc), *rng.uniform(0.01, 0.99, 2), *rng.uniform(0.02, 0.9, 2)])
            if shared:  # same cell and similar shape: same anchor, later one overwrites
                rows.append([b, rng.integers(nc), rows[-1][2], rows[-1][3], rows[-1][4] * 1.01, rows[-1][5]])
    targets = torch.tensor(np.array(rows, dtype=np.float32))
    xs = [torch.tensor(rng.normal(0, 1, (batch, 3 * (5 + nc), img // s, img // s)).astype(np.float32),
                       requires_grad=True) for s in (32, 16, 8)]
    out = YOLOv3Loss(nc, img_size=img, flavor="pytorch-yolov3", noobj_scale=noobj_scale)(xs, targets)
    out.total.backward()
    xr = [x.detach().clone().requires_grad_() for x in xs]
    ref = [layer_by_rules(x, targets, [ANCHORS[m] for m in mask], img, nc, noobj_scale=noobj_scale)
           for x, mask in zip(xr, MASKS)]
    total = sum(r[0] for r in ref)
    total.backward()
    assert float(out.total.detach()) == pytest.approx(float(total.detach()), rel=1e-5)
    for x, x_ref in zip(xs, xr):
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-7)
    for got, (_, conf_obj, conf_noobj) in zip(out.stats["layers"], ref):
        assert got["conf_obj"] == pytest.approx(conf_obj, rel=1e-5)
        assert got["conf_noobj"] == pytest.approx(conf_noobj, rel=1e-5)


def _tiny(box_scale):
    """One 64 x 64 image, one class, one layer of stride 32 (grid 2 x 2), three anchors."""
    loss_fn = YOLOv3Loss(1, anchors=((32, 16), (8, 8), (60, 60)), masks=((0, 1, 2),), strides=(32,),
                         img_size=64, flavor="pytorch-yolov3", box_scale=box_scale)
    x = torch.zeros(1, 3, 6, 2, 2)
    x[0, 0, 2, 1, 0] = 0.2  # raw w at anchor 0, cell (gy=1, gx=0)
    x[0, 0, 3, 1, 0] = -0.1  # raw h
    x = x.reshape(1, 18, 2, 2).requires_grad_()
    targets = torch.tensor([[0.0, 0.0, 0.3, 0.7, 0.5, 0.25]])
    out = loss_fn([x], targets)
    out.total.backward()
    return out, x.grad.reshape(1, 3, 6, 2, 2)


def test_box_scale_two_minus_wh_by_hand():
    # Derivation. Grid 2: gx = 0.3*2 = 0.6 -> gi 0, tx 0.6; gy = 0.7*2 = 1.4 -> gj 1, ty 0.4;
    # gw = 0.5*2 = 1, gh = 0.25*2 = 0.5. Stride 64/2 = 32: anchors (1, 0.5), (0.25, 0.25), (1.875, 1.875).
    # wh-IoU: anchor 0: 0.5/(0.5+0.5-0.5) = 1; anchor 1: 0.0625/0.5 = 0.125; anchor 2: 0.5/3.515625
    # = 0.142 -> best anchor 0, the only one above 0.5. tw = log(1/1) = 0, th = log(0.5/0.5) = 0.
    # lambda = 2 - (1/2)*(0.5/2) = 1.875. Zero logits give sigmoid 0.5.
    lam = 2 - 0.5 * 0.25
    loss_x = lam * (0.5 - 0.6) ** 2
    loss_y = lam * (0.5 - 0.4) ** 2
    loss_w = lam * (0.2 - 0.0) ** 2
    loss_h = lam * (-0.1 - 0.0) ** 2
    # confidences 0.5 everywhere: obj BCE ln 2 over the one cell; noobj: 12 - 1 cells, mean ln 2,
    # weighted 100; the single class: ln 2.
    ln2 = math.log(2)
    want = loss_x + loss_y + loss_w + loss_h + ln2 + 100 * ln2 + ln2
    out, grad = _tiny("2-wh")
    assert float(out.total.detach()) == pytest.approx(want, rel=1e-6)
    assert float(out.components["xy"]) == pytest.approx(loss_x + loss_y, rel=1e-5)
    assert float(out.components["wh"]) == pytest.approx(loss_w + loss_h, rel=1e-6)
    # d/draw_x lam (sigmoid - 0.6)^2 = 2 lam (0.5 - 0.6) 0.5 (1 - 0.5); d/draw_w lam w^2 = 2 lam 0.2
    assert float(grad[0, 0, 0, 1, 0]) == pytest.approx(2 * lam * (0.5 - 0.6) * 0.25, rel=1e-5)
    assert float(grad[0, 0, 1, 1, 0]) == pytest.approx(2 * lam * (0.5 - 0.4) * 0.25, rel=1e-5)
    assert float(grad[0, 0, 2, 1, 0]) == pytest.approx(2 * lam * 0.2, rel=1e-6)
    assert float(grad[0, 0, 3, 1, 0]) == pytest.approx(2 * lam * -0.1, rel=1e-6)
    # without the scale: the original
    out, grad = _tiny("none")
    assert float(out.components["xy"] + out.components["wh"]) == pytest.approx(0.01 + 0.01 + 0.04 + 0.01, rel=1e-5)
    assert float(grad[0, 0, 2, 1, 0]) == pytest.approx(2 * 0.2, rel=1e-6)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3 * 7, h, w, generator=g, dtype=torch.float64, requires_grad=True)
          for h, w in ((2, 3), (4, 6))]
    targets = torch.tensor([[0, 1, .3, .6, .2, .3], [0, 0, .3, .6, .21, .3], [1, 1, .8, .2, .6, .5]], dtype=torch.float64)
    for box_scale in ("none", "2-wh"):
        loss_fn = YOLOv3Loss(2, masks=((6, 7, 8), (3, 4, 5)), strides=(32, 16), img_size=(64, 96),
                             flavor="pytorch-yolov3", box_scale=box_scale)
        assert torch.autograd.gradcheck(lambda *x: loss_fn(list(x), targets).total, xs, fast_mode=True)


def test_non_square_by_axis_symmetry():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 24, h, w, generator=g, requires_grad=True) for h, w in ((2, 4), (4, 8), (8, 16))]
    targets = torch.tensor([[0, 1, .3, .6, .2, .3], [1, 2, .7, .2, .5, .1], [1, 0, .1, .9, .05, .07]])
    kw = dict(flavor="pytorch-yolov3", box_scale="2-wh")
    out = YOLOv3Loss(3, img_size=(64, 128), **kw)(xs, targets)
    out.total.backward()
    perm = [1, 0, 3, 2, 4, 5, 6, 7]

    def swap(t):
        return t.reshape(2, 3, 8, *t.shape[2:])[:, :, perm].transpose(-1, -2).reshape(2, 24, t.shape[3], t.shape[2])

    xt = [swap(x.detach()).requires_grad_() for x in xs]
    out_t = YOLOv3Loss(3, anchors=[(h, w) for w, h in ANCHORS], img_size=(128, 64), **kw)(xt, targets[:, [0, 1, 3, 2, 5, 4]])
    out_t.total.backward()
    assert float(out_t.total.detach()) == pytest.approx(float(out.total.detach()), rel=1e-5)
    for x, x2 in zip(xs, xt):
        torch.testing.assert_close(swap(x2.grad), x.grad)
    assert out.stats["layers"][0]["grid_size"] == (2, 4)


def test_empty_targets_and_half():
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(2, 24, s, s, generator=g) for s in (2, 4, 8)]
    loss_fn = YOLOv3Loss(3, img_size=64, flavor="pytorch-yolov3")
    half = [x.half().requires_grad_() for x in xs]
    out = loss_fn(half, torch.zeros(0, 6))
    out.total.backward()
    # only the no-object term: 100 * mean over all cells of -log(1 - sigmoid(t)) = softplus(t)
    want = sum(100 * torch.nn.functional.softplus(x.half().float().reshape(2, 3, 8, s, s)[:, :, 4]).mean()
               for x, s in zip(xs, (2, 4, 8)))
    assert out.total.dtype == torch.float32 and float(out.total.detach()) == pytest.approx(float(want), rel=1e-5)
    assert all(x.grad.dtype == torch.float16 and torch.isfinite(x.grad).all() for x in half)
    assert out.stats["num_pos"] == 0 and out.stats["layers"][0]["cls_acc"] is None


def test_extreme_logits_finite():
    g = torch.Generator().manual_seed(3)
    xs = [((torch.randint(0, 2, (1, 24, s, s), generator=g) * 2 - 1) * 1e4).float().requires_grad_() for s in (2, 4, 8)]
    targets = torch.tensor([[0, 1, .3, .6, .2, .3], [0, 2, .7, .2, .5, .1]])
    out = YOLOv3Loss(3, img_size=64, flavor="pytorch-yolov3", box_scale="2-wh")(xs, targets)
    out.total.backward()
    assert torch.isfinite(out.total) and all(torch.isfinite(x.grad).all() for x in xs)


def test_assignment_alone():
    xs = [torch.zeros(2, 24, s, s) for s in (2, 4, 8)]
    targets = torch.tensor([[0, 1, .3, .6, .2, .3], [0, 2, .3, .6, .2, .3], [1, 0, 1.0, 1.0, .1, .1]])
    layers = assign_pytorch_yolov3(xs, targets, ANCHORS, MASKS, (64, 64), ignore_thresh=0.5)
    for a, x in zip(layers, xs):
        s = x.shape[-1]
        assert tuple(a.obj_mask.shape) == (2, 3, s, s) and a.wh_iou.shape == (3, 3)
        assert int(a.obj_mask.sum()) == 2  # rows 0 and 1 share a cell and anchor
        assert not (a.obj_mask & a.noobj_mask).any()
        assert int(a.cell_truth[a.image[0], a.anchor[0], a.gy[0], a.gx[0]]) == 1  # the later row wins
        assert (a.gx[2], a.gy[2]) == (s - 1, s - 1)  # centre at 1.0: last cell


def test_bad_flavor_arguments():
    with pytest.raises(ValueError, match="box_scale"):
        YOLOv3Loss(3, flavor="pytorch-yolov3", box_scale="2wh")
    with pytest.raises(ValueError, match="noobj_scale"):
        YOLOv3Loss(3, flavor="pytorch-yolov3", noobj_scale=-1)
    assert YOLOv3Loss(3, flavor="pytorch-yolov3").ignore_thresh == 0.5
    assert YOLOv3Loss(3).ignore_thresh == 0.7
