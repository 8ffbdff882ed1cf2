"""The DETR family's terms: gradcheck in float64, closed-form gradients where a factor is detached
(its numerical derivative would include the stop-gradient factor), and the FGL bins against the
formulas of D-FINE's paper."""
from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from detloss.functional import detr_terms as T
from detloss.boxes import cxcywh_to_xyxy
from test_detr_edge import NC, REG, family_outputs, make_loss, random_targets, require_grad

D = torch.float64


def boxes(g, n):
    c = torch.rand(n, 2, generator=g, dtype=D) * 0.6 + 0.2
    wh = torch.rand(n, 2, generator=g, dtype=D) * 0.3 + 0.05
    return cxcywh_to_xyxy(torch.cat((c, wh), 1))


@pytest.mark.parametrize("kind", ["iou", "giou"])
def test_paired_box_iou_gradcheck_and_matrix_diagonal(kind):
    g = torch.Generator().manual_seed(0)
    a, b = boxes(g, 6).requires_grad_(), boxes(g, 6).requires_grad_()
    assert gradcheck(lambda x, y: T.paired_box_iou(x, y, kind=kind), (a, b))
    from detloss.functional import pairwise_box_iou

    torch.testing.assert_close(T.paired_box_iou(a, b, kind=kind), pairwise_box_iou(a, b, kind=kind).diagonal())
    zero = torch.zeros(1, 4, dtype=D)
    assert float(T.paired_box_iou(zero, zero, kind=kind)) == 0.0  # torchvision's pairwise: NaN


def test_fgl_gradcheck_and_value():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, REG + 1, generator=g, dtype=D, requires_grad=True)
    bins = torch.rand(8, generator=g, dtype=D) * (REG - 0.1)
    wr = torch.rand(8, generator=g, dtype=D)
    w = torch.rand(8, generator=g, dtype=D)
    assert gradcheck(lambda x: T.fine_grained_localization_loss(x, bins, wr, 1 - wr, weight=w), (z,))
    logp = torch.log_softmax(z, 1)
    left = bins.long()
    expected = -(w * ((1 - wr) * logp[range(8), left] + wr * logp[range(8), left + 1])).sum()
    torch.testing.assert_close(T.fine_grained_localization_loss(z, bins, wr, 1 - wr, weight=w), expected)


def test_ddf_gradcheck_and_value():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(6, REG + 1, generator=g, dtype=D, requires_grad=True)
    t = torch.randn(6, REG + 1, generator=g, dtype=D)
    w = torch.rand(6, generator=g, dtype=D)
    assert gradcheck(lambda x: T.decoupled_distillation_loss(x, t, weight=w), (z,))
    p, q = torch.softmax(z / 5, 1), torch.softmax(t / 5, 1)
    torch.testing.assert_close(T.decoupled_distillation_loss(z, t, weight=w), w * 25 * (q * (q.log() - p.log())).sum(1))
    assert float(T.decoupled_distillation_loss(t, t).abs().max()) < 1e-12


def _class_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(3, 4, NC, generator=g, dtype=D) * 3).requires_grad_()
    label = torch.zeros(3, 4, NC, dtype=D)
    label[0, 1, 2] = label[2, 3, 0] = 1
    score = label * torch.rand(3, 4, NC, generator=g, dtype=D)
    return x, score, label


def test_detached_varifocal_gradient_is_the_weighted_bce_gradient():
    x, q, lab = _class_inputs(3)
    loss = T.set_varifocal_loss(x, q, lab, alpha=0.75, gamma=2.0)
    w = 0.75 * torch.sigmoid(x.detach()) ** 2 * (1 - lab) + q
    p = torch.sigmoid(x.detach())
    bce = -(q * torch.log(p) + (1 - q) * torch.log1p(-p))
    torch.testing.assert_close(loss, bce * w)
    (gx,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(gx, w * (p - q))  # d/dx BCE(x, q) = sigmoid(x) - q; the weight has no gradient


def test_varifocal_with_its_weight_gradient_is_ultralytics_form():
    x, q, lab = _class_inputs(5)
    assert gradcheck(lambda z: T.set_varifocal_loss(z, q, lab, alpha=0.25, gamma=1.5, detach_weight=False), (x,))
    from detloss.functional import varifocal_loss

    ours = T.set_varifocal_loss(x, q, lab, alpha=0.25, gamma=1.5, detach_weight=False)
    ref = varifocal_loss(x, q, lab, alpha=0.25, gamma=1.5, reduction="none")
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours.sum(), x)[0], torch.autograd.grad(ref.sum(), x)[0])


@pytest.mark.parametrize("alpha", [None, 0.75])
def test_matchability_aware_gradient_and_value(alpha):
    x, q, lab = _class_inputs(4)
    loss = T.matchability_aware_loss(x, q, lab, gamma=1.5, alpha=alpha)
    p = torch.sigmoid(x.detach())
    w = (1.0 if alpha is None else alpha) * p ** 1.5 * (1 - lab) + lab
    target = q ** 1.5
    torch.testing.assert_close(loss, -w * (target * torch.log(p) + (1 - target) * torch.log1p(-p)))
    (gx,) = torch.autograd.grad(loss.sum(), x)
    torch.testing.assert_close(gx, w * (p - target))


def test_fgl_bins_follow_the_weighting_function():
    up, s = torch.tensor([0.5], dtype=D), torch.tensor([4.0], dtype=D)
    values = T.fgl_bin_values(REG, up, s)
    c = (0.5 * 4 + 1) ** (2 / (REG - 2))
    inner = [-(c ** i) + 1 for i in range(REG // 2 - 1, 0, -1)] + [0.0] + [c ** i - 1 for i in range(1, REG // 2)]
    torch.testing.assert_close(values, torch.tensor([-4.0] + inner + [4.0], dtype=D))
    # a reference box whose sides lie at known distances: d = (x_ref - x1) / (w_ref / s) - s / 2
    ref = torch.tensor([[0.5, 0.5, 0.2, 0.2]], dtype=D)
    d = torch.tensor([values[3] * 0.7 + values[4] * 0.3, -9.0, 9.0, (values[4] + values[5]) / 2], dtype=D)
    x1 = 0.5 - (d[0] + 2) * 0.05
    y1 = 0.5 - (d[1] + 2) * 0.05
    x2 = 0.5 + (d[2] + 2) * 0.05
    y2 = 0.5 + (d[3] + 2) * 0.05
    bins, wr, wl = T.fgl_targets(ref, torch.stack((x1, y1, x2, y2))[None], REG, s, up)
    torch.testing.assert_close(bins, torch.tensor([3.0, 0.0, REG - 0.1, 4.0], dtype=D))
    torch.testing.assert_close(wr, torch.tensor([0.3, 0.0, 1.0, 0.5], dtype=D))
    torch.testing.assert_close(wl, 1 - wr)


# ---------------------------------------------------------------------- each loss's terms, through the loss
def _dict_gradcheck(loss_fn, out, tgt, paths):
    """gradcheck of the total w.r.t. the tensors at ``paths`` (the others held fixed)."""
    def get(path):
        node = out
        for p in path:
            node = node[p]
        return node

    def put(path, value):
        node = out
        for p in path[:-1]:
            node = node[p]
        node[path[-1]] = value

    originals = [get(p).detach() for p in paths]

    def f(*xs):
        for p, x in zip(paths, xs):
            put(p, x)
        return loss_fn(out, tgt).total

    # fast mode: a random directional derivative per input (the full Jacobian would take minutes)
    return gradcheck(f, tuple(o.clone().requires_grad_() for o in originals), atol=1e-6, rtol=1e-4, fast_mode=True)


def test_detr_terms_gradcheck():
    g = torch.Generator().manual_seed(5)
    out = family_outputs("detr", g, 2, 4, num_aux=1)
    tgt = random_targets(g, [2, 1])
    paths = [("pred_logits",), ("pred_boxes",), ("aux_outputs", 0, "pred_logits"), ("aux_outputs", 0, "pred_boxes")]
    assert _dict_gradcheck(make_loss("detr"), out, tgt, paths)


def test_rtdetr_box_terms_gradcheck():
    g = torch.Generator().manual_seed(6)
    out = family_outputs("rtdetrv2", g, 2, 4, dn_counts=[2, 1], num_aux=1)
    tgt = random_targets(g, [2, 1])
    paths = [("pred_boxes",), ("aux_outputs", 0, "pred_boxes"), ("dn_aux_outputs", 0, "pred_boxes"),
             ("enc_aux_outputs", 0, "pred_boxes")]
    assert _dict_gradcheck(make_loss("rtdetrv2", losses=["boxes"]), out, tgt, paths)


def test_ultralytics_terms_gradcheck():
    # its varifocal weight keeps its gradient: the class loss is a function of the logits
    g = torch.Generator().manual_seed(7)
    out = family_outputs("ultralytics", g, 2, 4, dn_counts=[2, 1], num_aux=1)
    tgt = random_targets(g, [2, 1])
    paths = [("pred_logits",), ("aux_outputs", 0, "pred_logits"), ("dn_aux_outputs", 1, "pred_logits")]
    assert _dict_gradcheck(make_loss("ultralytics"), out, tgt, paths)


@pytest.mark.parametrize("kind", ["dfine", "deim"])
def test_local_terms_gradcheck(kind):
    # FGL and DDF of the earlier layers w.r.t. their corners (the teacher held fixed)
    g = torch.Generator().manual_seed(8)
    out = family_outputs(kind, g, 2, 4, dn_counts=[2, 1], num_aux=1)
    tgt = random_targets(g, [2, 1])
    paths = [("aux_outputs", 0, "pred_corners"), ("dn_outputs", 0, "pred_corners")]
    assert _dict_gradcheck(make_loss(kind, losses=["local"]), out, tgt, paths)


def test_gradients_flow_to_every_trained_tensor():
    g = torch.Generator().manual_seed(9)
    out = require_grad(family_outputs("dfine", g, 2, 5, dn_counts=[2, 1]))
    res = make_loss("dfine")(out, random_targets(g, [2, 1]))
    res.total.backward()
    assert all(d["pred_corners"].grad is not None and float(d["pred_corners"].grad.abs().sum()) > 0
               for d in [out] + out["aux_outputs"] + out["dn_outputs"])
    assert math.isfinite(float(res.total.detach()))


def _onehot(shape, bi, qi, lab, score):
    label = torch.zeros(shape, dtype=D)
    label[bi, qi, lab] = 1
    target = torch.zeros(shape, dtype=D)
    target[bi, qi, lab] = score
    return label, target


def _dense_class_loss(x, label, target, kind, alpha, gamma):
    """The class losses on explicit one-hot tensors, written from their papers' formulas."""
    p = torch.sigmoid(x)
    bce = lambda y: torch.clamp(x, min=0) - x * y + torch.log1p(torch.exp(-x.abs()))  # noqa: E731
    if kind == "bce":
        return bce(target).sum()
    if kind == "focal":  # Lin et al. 2017 with alpha_t
        p_t = p * label + (1 - p) * (1 - label)
        return ((alpha * label + (1 - alpha) * (1 - label)) * (1 - p_t) ** gamma * bce(label)).sum()
    weight = alpha * p**gamma * (1 - label) + target * label  # VarifocalNet, ultralytics' weighting
    return (bce(target) * weight).sum()


@pytest.mark.parametrize("kind", ["varifocal", "focal", "bce"])
@pytest.mark.parametrize("alpha,gamma", [(0.25, 1.5), (0.75, 2.0), (0.5, 0.5)])
def test_onehot_class_loss_equals_the_dense_loss_and_gradchecks(kind, alpha, gamma):
    g = torch.Generator().manual_seed(11)
    shape = (2, 6, 5)
    x = (torch.randn(shape, generator=g, dtype=D) * 3).requires_grad_()
    bi, qi, lab = torch.tensor([0, 0, 1, 1]), torch.tensor([1, 4, 0, 5]), torch.tensor([2, 0, 4, 2])
    score = torch.rand(4, generator=g, dtype=D)
    label, target = _onehot(shape, bi, qi, lab, score)
    got = T.onehot_class_loss(x, bi, qi, lab, score, kind=kind, alpha=alpha, gamma=gamma)
    want = _dense_class_loss(x, label, target, kind, alpha, gamma)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gx, = torch.autograd.grad(got, x)
    wx, = torch.autograd.grad(want, x)
    torch.testing.assert_close(gx, wx, rtol=1e-10, atol=1e-12)
    assert gradcheck(lambda t: T.onehot_class_loss(t, bi, qi, lab, score, kind=kind, alpha=alpha, gamma=gamma),
                     (x.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("kind", ["varifocal", "focal", "bce"])
def test_onehot_class_loss_is_finite_at_extreme_matched_logits(kind):
    # matched logits at +-1e4 and at -200 (sigmoid underflows to 0 in float32), gamma < 1 too
    x = torch.zeros(1, 4, 3)
    x[0, :, 1] = torch.tensor([1e4, -1e4, -200.0, 30.0])
    x.requires_grad_()
    qi, lab = torch.arange(4), torch.ones(4, dtype=torch.int64)
    for gamma in (0.5, 1.5):
        loss = T.onehot_class_loss(x, torch.zeros(4, dtype=torch.int64), qi, lab, torch.full((4,), 0.5),
                                   kind=kind, alpha=0.25, gamma=gamma)
        grad, = torch.autograd.grad(loss, x)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_layers_box_terms_equal_the_per_layer_terms():
    # one call over every layer's pairs (a layer without pairs included) = box_terms layer by layer
    from detloss.losses.detr import box_terms, layers_box_terms

    g = torch.Generator().manual_seed(12)
    def cxcywh(n):
        return torch.cat((torch.rand(n, 2, generator=g, dtype=D) * 0.6 + 0.2,
                          torch.rand(n, 2, generator=g, dtype=D) * 0.3 + 0.05), 1)
    pairs = [(cxcywh(n).requires_grad_(), cxcywh(n)) for n in (3, 0, 5)]
    got = layers_box_terms(pairs, 4.0)
    want = [box_terms(s, t, 4.0) for s, t in pairs]
    for a, b in zip(got, want):
        for k in ("loss_bbox", "loss_giou"):
            torch.testing.assert_close(a[k], b[k], rtol=1e-13, atol=1e-15)
    srcs = [s for s, _ in pairs]
    g1 = torch.autograd.grad(sum(d["loss_bbox"] + 2 * d["loss_giou"] for d in got), srcs)
    g2 = torch.autograd.grad(sum(d["loss_bbox"] + 2 * d["loss_giou"] for d in want), srcs)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
