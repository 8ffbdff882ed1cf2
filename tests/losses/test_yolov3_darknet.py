"""YOLOv3Loss(flavor="darknet") and assign_darknet against :func:`darknet_by_rules`, written here
from the rules that detloss.losses.yolov3's module docstring and the darknet reference manifest's
notes state (it shares no code with detloss and is no copy of darknet's C): random cases with any
number of layers, non-square images, truths sharing a cell, low ignore/truth thresholds and
saturated class-0 probabilities (the zero class-0 delta that rewrites the class targets). Parity
with darknet's own recorded outputs (tests/data/darknet/, SOURCE: "pjreddie/darknet commit
f6afaabc, src/yolo_layer.c forward_yolo_layer (with box.c, activations.c, blas.c), compiled for CPU
with gcc -O0 -ffp-contract=off and driven by a small harness; float32 arithmetic as in darknet.")
is in test_yolov3_reference.py. Plus gradcheck, half precision, extreme logits, empty targets,
a batch of no images and bad input.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from detloss import YOLOv3Loss
from detloss.assign.darknet import assign_darknet

ANCHORS = ((10, 13), (16, 30), (33, 23), (30, 61), (62, 45), (59, 119), (116, 90), (156, 198), (373, 326))
LAYOUTS = {  # name: (masks, strides)
    "yolov3": (((6, 7, 8), (3, 4, 5), (0, 1, 2)), (32, 16, 8)),
    "one": (((0, 1, 2, 3, 4, 5, 6, 7, 8),), (16,)),
    "two": (((5, 6, 7, 8), (0, 1, 2, 3, 4)), (32, 8)),
    "four": (((7, 8), (4, 5), (2, 3), (0, 1)), (32, 16, 8, 4)),  # anchor 6 in no mask
}


# ------------------------------------------------------------------------------------------------
# darknet's rules, as the module docstring of detloss.losses.yolov3 and the reference manifest's
# notes state them: per layer, the gradient of the loss w.r.t. the raw input (= minus darknet's
# delta), written as "target of each entry", entries without a target getting no gradient.


def _logistic32(v):
    """darknet's stored activations: the logistic in double, rounded to float32 (kept in float64)."""
    return torch.sigmoid(v.double()).float().double()


def centre_iou(a, b):
    """IoU of centre-form boxes ``(cx, cy, w, h)`` (broadcast): the overlap of the two intervals on
    each axis (none if either is negative) over the union of the areas, no eps; undefined (0/0,
    inf/inf) counts as 0, so that it never becomes a best IoU."""
    lo = torch.maximum(a[..., :2] - a[..., 2:] / 2, b[..., :2] - b[..., 2:] / 2)
    hi = torch.minimum(a[..., :2] + a[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2)
    side = hi - lo
    inter = torch.where((side < 0).any(-1), torch.zeros_like(side[..., 0]), side[..., 0] * side[..., 1])
    union = a[..., 2] * a[..., 3] + b[..., 2] * b[..., 3] - inter
    return torch.nan_to_num(inter / union, nan=0.0, posinf=0.0, neginf=0.0)


def darknet_by_rules(inputs, targets, masks, net_hw, classes, ignore_thresh, truth_thresh):
    """Per layer: (d loss / d raw input [B, A*(5+C), H, W], printed figures, positives
    [(image, anchor slot, gy, gx, row)] in write order, ignore mask [B, A, H, W]).

    Rules. p = logistic of tx, ty, objectness and classes; a prediction's box is
    ((gx + p_x) / W, (gy + p_y) / H, e^tw a_w / net_w, e^th a_h / net_h) with its slot's anchor.
    Per image, first every prediction: objectness target 0, except no target when its best IoU
    with the image's truths exceeds ignore_thresh; when it exceeds truth_thresh, the truth of
    that best IoU (first on ties) is written into the prediction. Then each truth in order: its
    cell (int(cx W), int(cy H)); its anchor the best of ALL anchors by the IoU of the two shapes
    centred at the origin (first on ties), written only if the layer's mask holds it. Writing
    truth (cx, cy, w, h) of class c into a slot sets objectness target 1, box targets
    (cx W - gx, cy H - gy) on p_xy with BCE and (log(w net_w / a_w), log(h net_h / a_h)) on the
    raw tw, th with half squared error, both weighted s = 2 - w h (so the gradients are
    s (p - t) and s (t_raw - t)), a later write replacing an earlier one; and the class targets:
    the one-hot of c if nothing was written there yet or p_0 equals the current class-0 target
    (darknet's zero class-0 delta), else the current targets with class c set to 1.
    """
    net_h, net_w = net_hw
    anchors = torch.tensor(ANCHORS, dtype=torch.float64)
    rows32 = targets.float()
    t = targets.double()
    results = []
    for x, mask in zip(inputs, masks):
        nb, _, lh, lw = x.shape
        na = len(mask)
        raw = x.detach().double().reshape(nb, na, 5 + classes, lh, lw)
        logistic = [0, 1] + list(range(4, 5 + classes))
        p = raw.clone()
        p[:, :, logistic] = _logistic32(raw[:, :, logistic])
        anchor_wh = anchors[list(mask)] / torch.tensor([net_w, net_h], dtype=torch.float64)  # [A, 2]
        gy, gx = torch.meshgrid(torch.arange(lh, dtype=torch.float64), torch.arange(lw, dtype=torch.float64), indexing="ij")
        boxes = torch.stack(
            ((gx + p[:, :, 0]) / lw, (gy + p[:, :, 1]) / lh,
             raw[:, :, 2].exp() * anchor_wh[:, 0, None, None], raw[:, :, 3].exp() * anchor_wh[:, 1, None, None]), -1
        )  # [B, A, H, W, 4]
        grad = torch.zeros_like(raw)
        grad[:, :, 4] = p[:, :, 4]  # objectness toward 0 everywhere first
        ignore = torch.zeros(nb, na, lh, lw, dtype=torch.bool)
        class_target = {}
        positives, ious, obj_at, cls_at = [], [], [], []

        def write(b, n, j, i, r):
            cx, cy, w, h = t[r, 2:6].tolist()
            s = 2 - w * h
            a_w, a_h = (anchors[mask[n]] / torch.tensor([net_w, net_h], dtype=torch.float64)).tolist()
            grad[b, n, 0, j, i] = s * (p[b, n, 0, j, i] - (cx * lw - i))
            grad[b, n, 1, j, i] = s * (p[b, n, 1, j, i] - (cy * lh - j))
            grad[b, n, 2, j, i] = s * (raw[b, n, 2, j, i] - math.log(w / a_w))
            grad[b, n, 3, j, i] = s * (raw[b, n, 3, j, i] - math.log(h / a_h))
            grad[b, n, 4, j, i] = p[b, n, 4, j, i] - 1
            c = int(t[r, 1])
            current = class_target.get((b, n, j, i))
            if current is None or float(p[b, n, 5, j, i]) == current[0]:
                current = [0.0] * classes
            current = list(current)
            current[c] = 1.0
            class_target[(b, n, j, i)] = current

        for b in range(nb):
            rows = [r for r in range(t.shape[0]) if int(t[r, 0]) == b]
            if rows:
                iou = centre_iou(boxes[b][..., None, :], t[rows, 2:6])  # [A, H, W, T]
                best, which = iou.max(-1)  # the first of equal maxima
                ignore[b] = best > ignore_thresh
                grad[b, :, 4][ignore[b]] = 0.0
                for n, j, i in (best > truth_thresh).nonzero().tolist():
                    write(b, n, j, i, rows[int(which[n, j, i])])
            for r in rows:
                i = min(int(rows32[r, 2] * lw), lw - 1)  # float32 product, truncated
                j = min(int(rows32[r, 3] * lh), lh - 1)
                w, h = t[r, 4], t[r, 5]
                shapes = [float(centre_iou(torch.tensor([0.0, 0.0, aw / net_w, ah / net_h], dtype=torch.float64),
                                           torch.stack((w * 0, h * 0, w, h)))) for aw, ah in ANCHORS]
                best_anchor = max(range(len(ANCHORS)), key=lambda k: (shapes[k], -k))
                if best_anchor not in mask:
                    continue
                n = list(mask).index(best_anchor)
                ious.append(float(centre_iou(boxes[b, n, j, i], t[r, 2:6])))
                obj_at.append(float(p[b, n, 4, j, i]))
                cls_at.append(float(p[b, n, 5 + int(t[r, 1]), j, i]))
                write(b, n, j, i, r)
                positives.append((b, n, j, i, r))
        for (b, n, j, i), target in class_target.items():
            grad[b, n, 5:, j, i] = p[b, n, 5:, j, i] - torch.tensor(target, dtype=torch.float64)
        count = len(positives)

        def mean(values):
            return sum(values) / count if count else None

        stats = {"avg_iou": mean(ious), "class": mean(cls_at), "obj": mean(obj_at),
                 "no_obj": float(p[:, :, 4].mean()), "recall50": mean([float(v > 0.5) for v in ious]),
                 "recall75": mean([float(v > 0.75) for v in ious]), "count": count}
        results.append((grad.reshape(x.shape).float(), stats, positives, ignore))
    return results


# ------------------------------------------------------------------------------------------------
# random cases


def make_case(seed, layout, batch, classes, net_hw, per_image, shared, saturate, near):
    rng = np.random.default_rng(seed)
    masks, strides = LAYOUTS[layout]
    net_h, net_w = net_hw
    rows = []
    for b in range(batch):
        for _ in range(per_image):
            rows.append([b, rng.integers(classes), *rng.uniform(0.02, 0.98, 2), *rng.uniform(0.03, 0.9, 2)])
            if shared and rng.random() < 0.6:  # a second truth in the same cell (same centre, close size)
                r = list(rows[-1])
                r[1] = rng.integers(classes)
                r[4:6] = [min(0.95, v * rng.uniform(0.9, 1.1)) for v in r[4:6]]
                rows.append(r)
    targets = torch.tensor(np.array(rows, dtype=np.float32).reshape(-1, 6))
    inputs = []
    for mask, s in zip(masks, strides):
        h, w = net_h // s, net_w // s
        x = rng.normal(0.0, 1.0, (batch, len(mask), 5 + classes, h, w)).astype(np.float32)
        if near:  # predicted sizes near the anchors' scale so that IoUs reach the thresholds
            x[:, :, 2:4] *= 0.3
        if saturate:  # class-0 probability exactly 1 or 0 in float32
            x[:, :, 5] = rng.choice([40.0, -200.0], size=x[:, :, 5].shape)
        inputs.append(torch.tensor(x.reshape(batch, -1, h, w), requires_grad=True))
    loss_fn_kwargs = dict(anchors=ANCHORS, masks=masks, strides=strides, img_size=net_hw)
    return inputs, targets, loss_fn_kwargs


case_args = st.fixed_dictionaries({
    "seed": st.integers(0, 2**31 - 1),
    "layout": st.sampled_from(sorted(LAYOUTS)),
    "batch": st.integers(1, 2),
    "classes": st.integers(1, 4),
    "net_hw": st.tuples(st.sampled_from([32, 64, 96]), st.sampled_from([32, 64, 96])),
    "per_image": st.integers(0, 4),
    "shared": st.booleans(),
    "saturate": st.booleans(),
    "near": st.booleans(),
})


_SATURATED_SHARED = dict(batch=1, classes=3, net_hw=(64, 64), per_image=4, shared=True, saturate=True, near=True)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=case_args, ignore_thresh=st.sampled_from([0.05, 0.3, 0.7]),
       truth_thresh=st.sampled_from([0.1, 0.4, 1.0]))
# two truths in one cell and anchor with p_0 saturated at the class-0 target: the rewrite branch
@example(case=dict(seed=1, layout="yolov3", **_SATURATED_SHARED), ignore_thresh=0.7, truth_thresh=1.0)
@example(case=dict(seed=7, layout="one", **_SATURATED_SHARED), ignore_thresh=0.3, truth_thresh=0.4)
def test_matches_darknets_rules(case, ignore_thresh, truth_thresh):
    inputs, targets, kw = make_case(**case)
    loss_fn = YOLOv3Loss(case["classes"], ignore_thresh=ignore_thresh, truth_thresh=truth_thresh, **kw)
    out = loss_fn(inputs, targets)
    out.total.backward()
    ref = darknet_by_rules(inputs, targets, kw["masks"], kw["img_size"], case["classes"], ignore_thresh, truth_thresh)
    asg = assign_darknet(inputs, targets, ANCHORS, kw["masks"], kw["img_size"], ignore_thresh, truth_thresh)
    for x, (grad, stats, positives, ignore), got, a in zip(inputs, ref, out.stats["layers"], asg):
        torch.testing.assert_close(x.grad, grad, rtol=1e-4, atol=1e-5)
        for key, want in stats.items():
            if want is None:
                assert got[key] is None
            else:
                assert got[key] == pytest.approx(want, rel=1e-5, abs=1e-6), key
        mine = list(zip(*(t.tolist() for t in (a.image, a.anchor, a.gy, a.gx, a.truth))))
        assert mine == positives
        assert torch.equal(a.ignore, ignore)
    assert torch.isfinite(out.total)


def test_reset_branch_of_delta_yolo_class():
    """Two truths in one cell and anchor: classes 0 then 1. With p_0 < 1 darknet keeps both classes
    positive; with p_0 == 1.0f the class-0 delta is 0 when the second truth comes, so darknet
    rewrites the whole vector and class 0 becomes a negative."""
    masks, strides = ((0, 1, 2),), (8,)
    targets = torch.tensor([[0, 0, 0.30, 0.30, 0.2, 0.25], [0, 1, 0.30, 0.30, 0.2, 0.25]])
    loss_fn = YOLOv3Loss(3, anchors=ANCHORS, masks=masks, strides=strides, img_size=32)
    a = assign_darknet([torch.zeros(1, 24, 4, 4)], targets, ANCHORS, masks, (32, 32))[0]
    n, j, i = int(a.anchor[0]), int(a.gy[0]), int(a.gx[0])
    assert a.anchor.tolist() == [n, n] and a.gy.tolist() == [j, j]  # same cell and anchor
    for class0_logit, want0 in ((0.5, 1.0), (40.0, 0.0)):
        x = torch.zeros(1, 3, 8, 4, 4)
        x[0, n, 5, j, i] = class0_logit
        x = x.reshape(1, 24, 4, 4).requires_grad_()
        loss_fn([x], targets).total.backward()
        g = x.grad.reshape(1, 3, 8, 4, 4)[0, n, 5:, j, i]
        p = torch.sigmoid(torch.tensor([class0_logit, 0.0, 0.0]))
        torch.testing.assert_close(-g, torch.tensor([want0, 1.0, 0.0]) - p)


def test_gradcheck_float64():
    inputs, targets, kw = make_case(3, "yolov3", 1, 2, (64, 96), 3, True, False, True)
    inputs = [x.detach().double().requires_grad_() for x in inputs]
    loss_fn = YOLOv3Loss(2, ignore_thresh=0.3, truth_thresh=0.4, **kw)
    a = assign_darknet(inputs, targets, ANCHORS, kw["masks"], kw["img_size"], 0.3, 0.4)
    assert sum(int(l.thresh.sum()) for l in a) > 0 and sum(int(l.ignore.sum()) for l in a) > 0
    assert torch.autograd.gradcheck(lambda *xs: loss_fn(list(xs), targets.double()).total, inputs, fast_mode=True)


def test_box_scale_none_removes_two_minus_wh():
    inputs, targets, kw = make_case(5, "yolov3", 1, 3, (64, 64), 3, False, False, False)
    grads = {}
    for scale in ("2-wh", "none"):
        xs = [x.detach().clone().requires_grad_() for x in inputs]
        YOLOv3Loss(3, box_scale=scale, **kw)(xs, targets).total.backward()
        grads[scale] = xs
    a = assign_darknet(inputs, targets, ANCHORS, kw["masks"], kw["img_size"])
    for l, layer in enumerate(a):
        for b, n, j, i, r in zip(layer.image, layer.anchor, layer.gy, layer.gx, layer.truth):
            s = 2 - float(targets[r, 4]) * float(targets[r, 5])
            g2 = grads["2-wh"][l].grad.reshape(1, 3, 8, *inputs[l].shape[2:])[b, n, :4, j, i]
            g1 = grads["none"][l].grad.reshape(1, 3, 8, *inputs[l].shape[2:])[b, n, :4, j, i]
            torch.testing.assert_close(g2, s * g1)


def test_transposed_problem_gives_the_same_loss():
    """Non-square grids: swapping the image axes (x <-> y everywhere) changes nothing."""
    inputs, targets, kw = make_case(11, "yolov3", 2, 3, (64, 128), 4, True, False, True)
    out = YOLOv3Loss(3, ignore_thresh=0.3, truth_thresh=0.5, **kw)(inputs, targets)
    out.total.backward()
    perm = [1, 0, 3, 2, 4] + list(range(5, 8))
    tx = [x.detach().reshape(2, 3, 8, *x.shape[2:])[:, :, perm].transpose(-1, -2).reshape(2, 24, x.shape[3], x.shape[2])
          .requires_grad_() for x in inputs]
    tt = targets[:, [0, 1, 3, 2, 5, 4]]
    kw_t = dict(kw, anchors=[(h, w) for w, h in ANCHORS], img_size=(128, 64))
    out_t = YOLOv3Loss(3, ignore_thresh=0.3, truth_thresh=0.5, **kw_t)(tx, tt)
    out_t.total.backward()
    assert float(out_t.total.detach()) == pytest.approx(float(out.total.detach()), rel=1e-5)
    for x, xt in zip(inputs, tx):
        g = xt.grad.reshape(2, 3, 8, *xt.shape[2:])[:, :, perm].transpose(-1, -2).reshape(x.shape)
        torch.testing.assert_close(g, x.grad)


def test_empty_targets():
    inputs, _, kw = make_case(2, "yolov3", 2, 3, (64, 64), 0, False, False, False)
    out = YOLOv3Loss(3, **kw)(inputs, torch.zeros(0, 6))
    out.total.backward()
    for x in inputs:
        g = x.grad.reshape(2, 3, 8, *x.shape[2:])
        xr = x.detach().reshape(2, 3, 8, *x.shape[2:])
        torch.testing.assert_close(g[:, :, 4], torch.sigmoid(xr[:, :, 4]))  # no-object everywhere
        assert not g[:, :, [0, 1, 2, 3, 5, 6, 7]].any()
    assert out.stats["num_pos"] == 0 and all(s["count"] == 0 and s["avg_iou"] is None for s in out.stats["layers"])
    want = sum(torch.nn.functional.softplus(x.detach().reshape(2, 3, 8, *x.shape[2:])[:, :, 4]).sum() for x in inputs)
    assert float(out.total.detach()) == pytest.approx(float(want), rel=1e-5)


def test_half_precision_and_extreme_logits():
    inputs, targets, kw = make_case(7, "yolov3", 2, 3, (64, 96), 3, True, False, False)
    loss_fn = YOLOv3Loss(3, **kw)
    half = [x.detach().half().requires_grad_() for x in inputs]
    out_h = loss_fn(half, targets)
    out_h.total.backward()
    assert out_h.total.dtype == torch.float32 and all(x.grad.dtype == torch.float16 for x in half)
    out_f = loss_fn([x.detach().float() for x in half], targets)
    assert float(out_h.total.detach()) == pytest.approx(float(out_f.total.detach()), rel=1e-6)
    bf = [x.detach().bfloat16().requires_grad_() for x in inputs]
    loss_fn(bf, targets).total.backward()
    assert all(torch.isfinite(x.grad.float()).all() for x in bf)
    x = inputs[2].detach().clone().reshape(2, 3, 8, *inputs[2].shape[2:])
    x[0, 0, 2], x[0, 0, 3] = 200.0, -200.0  # decoded w = inf, h = 0: darknet's IoU is NaN, never "best"
    layers = assign_darknet([inputs[0], inputs[1], x.reshape(inputs[2].shape)], targets, ANCHORS, kw["masks"], kw["img_size"])
    assert torch.isfinite(layers[2].best_iou).all() and not layers[2].best_iou[0, 0].any()
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16):
        big = [(torch.randint(0, 2, x.shape, generator=g) * 2 - 1).to(dtype).mul(1e4).requires_grad_() for x in inputs]
        out = loss_fn(big, targets)
        out.total.backward()
        assert torch.isfinite(out.total) and all(torch.isfinite(x.grad.float()).all() for x in big)


def test_assignment_alone():
    """assign_darknet needs no loss: positives per layer and the ignore mask, documented shapes."""
    inputs, targets, kw = make_case(1, "yolov3", 2, 3, (96, 64), 4, True, False, True)
    layers = assign_darknet(inputs, targets, ANCHORS, kw["masks"], kw["img_size"], ignore_thresh=0.5)
    assert len(layers) == 3
    assigned = torch.cat([a.truth for a in layers]).sort().values
    assert torch.equal(assigned, torch.arange(len(targets)))  # every truth in exactly one layer (all 9 anchors used)
    for a, x, mask in zip(layers, inputs, kw["masks"]):
        grid = (2, 3) + tuple(x.shape[2:])
        for name in ("best_iou", "best_truth", "ignore", "thresh", "positive", "box_truth"):
            assert tuple(getattr(a, name).shape) == grid, name
        assert a.ignore.dtype == torch.bool and a.truth.dtype == torch.int64
        assert torch.equal(a.anchor_index, torch.tensor(mask)[a.anchor])
        assert torch.equal(a.ignore, a.best_iou > 0.5)
        assert a.positive[a.image, a.anchor, a.gy, a.gx].all()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda x, t: ([x[0], x[1]], t), r"inputs: expected 3 layer tensors"),
        (lambda x, t: (x[0], t), r"inputs: expected a list"),
        (lambda x, t: ([x[0][:, :-1], x[1], x[2]], t), r"inputs\[0\]: expected shape \[B, 24, H, W\]"),
        (lambda x, t: ([x[0], x[1][..., :-1], x[2]], t), r"inputs\[1\]: expected grid \(4, 4\)"),
        (lambda x, t: ([x[0], x[1], x[2][:1]], t), r"inputs\[2\]: expected batch size 2"),
        (lambda x, t: ([x[0].long(), x[1], x[2]], t), r"inputs\[0\]: expected a floating-point tensor"),
        (lambda x, t: (x, t[:, :5]), r"targets: expected shape \[N, 6\]"),
        (lambda x, t: (x, t.long()), r"targets: expected a floating-point"),
        (lambda x, t: (x, torch.cat([t, torch.tensor([[0, 3.0, .5, .5, .1, .1]])])), r"class.*row 3"),
        (lambda x, t: (x, torch.cat([t, torch.tensor([[2, 0.0, .5, .5, .1, .1]])])), r"image index.*row 3"),
        (lambda x, t: (x, torch.cat([t, torch.tensor([[0, 0.0, 1.2, .5, .1, .1]])])), r"\[0, 1\].*row 3"),
        (lambda x, t: (x, torch.cat([t, torch.tensor([[0, 0.0, .5, .5, 0.0, .1]])])), r"w, h > 0.*row 3"),
        (lambda x, t: (x, torch.cat([t, torch.tensor([[0, 0.0, float("nan"), .5, .1, .1]])])), r"finite.*3"),
        (lambda x, t: (x, torch.cat([t, torch.tensor([[0, 0.0, .5, .5, 1e-30, 1e-30]])])), r"float32 area.*row 3"),
    ],
)
def test_bad_input(make, match):
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 24, s, s, generator=g) for s in (2, 4, 8)]
    targets = torch.tensor([[0, 1, .3, .3, .2, .2], [1, 2, .6, .4, .1, .3], [1, 0, .5, .5, .5, .5]])
    with pytest.raises((ValueError, TypeError), match=match):
        YOLOv3Loss(3, img_size=64)(*make(inputs, targets))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=0), "num_classes"),
        (dict(flavor="yolov4"), "flavor"),
        (dict(masks=((0, 1, 9),)), "masks"),
        (dict(strides=(32, 16)), "strides"),
        (dict(img_size=(416, 400)), "img_size"),
        (dict(anchors=((10, -1),)), "anchors"),
        (dict(box_scale="wh"), "box_scale"),
        (dict(ignore_thresh=float("nan")), "ignore_thresh"),
        (dict(noobj_scale=50), "obj_scale, noobj_scale"),
    ],
)
def test_bad_arguments(kwargs, match):
    kwargs = {"num_classes": 3, **kwargs}
    with pytest.raises((ValueError, TypeError), match=match):
        YOLOv3Loss(**kwargs)


def test_best_truth_iou_equals_a_loop_over_truths():
    """The vectorized ignore pass against darknet's own loop: for each truth in order, keep the
    IoU when it is strictly larger than the best so far (so ties keep the first truth)."""
    from detloss.assign import darknet

    g = torch.Generator().manual_seed(1)
    pred = torch.cat((torch.rand(2, 40, 2, generator=g), torch.rand(2, 40, 2, generator=g) * 0.5 + 0.01), -1)
    truth = torch.cat((torch.rand(2, 5, 2, generator=g), torch.rand(2, 5, 2, generator=g) * 0.4 + 0.05), -1)
    truth[1, 3] = truth[1, 1]  # a duplicate: a tie
    valid = torch.ones(2, 5, dtype=torch.bool)
    valid[0, 4] = False
    best, slot = darknet._best_truth_iou(pred, truth, valid)
    want_best = torch.zeros(2, 40)
    want_slot = torch.zeros(2, 40, dtype=torch.long)
    for t in range(5):
        iou = darknet.darknet_iou(pred, truth[:, t : t + 1].expand_as(pred))
        better = (iou > want_best) & valid[:, t : t + 1]
        want_best = torch.where(better, iou, want_best)
        want_slot = torch.where(better, t, want_slot)
    assert bool((best > 0).any())
    assert torch.equal(best, want_best) and torch.equal(slot[best > 0], want_slot[best > 0])


@pytest.mark.parametrize("flavor", ["darknet", "pytorch-yolov3"])
def test_assignment_terms_stats_and_decode(flavor):
    from detloss.assign.base import Assignment
    from detloss.losses.base import STAT_KEYS

    inputs, targets, kw = make_case(3, "yolov3", 2, 3, (96, 64), 4, True, False, True)
    loss_fn = YOLOv3Loss(3, flavor=flavor, **kw)
    asg = loss_fn.assign(inputs, targets)
    assert isinstance(asg, Assignment) and len(asg) == 3
    out = loss_fn(inputs, targets)
    assert out.stats["num_pos"] == asg.num_pos > 0
    assert out.stats["num_ignored"] == int(asg.ignore.sum())
    # pred_index: the layers' [A, H, W] cells, layers concatenated; target_index: the cell's row
    offset = 0
    for i, (a, x) in enumerate(zip(asg, inputs)):
        h, w = x.shape[2:]
        positive = a.positive if flavor == "darknet" else a.obj_mask
        owner = a.box_truth if flavor == "darknet" else a.cell_truth
        sel = asg.extras["level"] == i
        b, k, y, c = positive.nonzero(as_tuple=True)
        assert torch.equal(asg.pred_index[sel], offset + (k * h + y) * w + c)
        assert torch.equal(asg.target_index[sel], owner[b, k, y, c])
        offset += 3 * h * w
    assert torch.equal(asg.labels, targets[asg.target_index, 1].long())
    torch.testing.assert_close(sum(out.terms.values()), out.total, rtol=1e-6, atol=0)
    for k, typ in STAT_KEYS.items():
        assert type(out.stats[k]) is typ, k
    assert 0.0 < out.stats["iou_mean"] <= 1.0
    # decode: layer 0 (stride 32, 3 x 2 cells), anchor slot 1, cell (y 2, x 1), by hand
    zeros = [torch.zeros_like(x) for x in inputs]
    no = 8
    zeros[0][0, 1 * no + 2, 2, 1] = math.log(2.0)  # tw: twice the anchor's width
    boxes, scores = loss_fn.decode(zeros)
    k = 1 * 6 + 2 * 2 + 1
    aw, ah = ANCHORS[kw["masks"][0][1]]
    cx, cy = 1.5 * 32, 2.5 * 32
    torch.testing.assert_close(boxes[0, k], torch.tensor([cx - aw, cy - ah / 2, cx + aw, cy + ah / 2]))
    torch.testing.assert_close(scores[0, k], torch.full((3,), 0.25))
    assert boxes.shape == (2, sum(3 * x.shape[2] * x.shape[3] for x in inputs), 4)


@pytest.mark.parametrize("flavor", ["darknet", "pytorch-yolov3"])
def test_a_batch_of_no_images(flavor):
    """A zero loss connected to the inputs; darknet's figures are None where it would print nan
    (every mean over nothing, no_obj included), PyTorch-YOLOv3's metrics are its own at zero."""
    inputs = [torch.zeros(0, 24, s, s, requires_grad=True) for s in (2, 4, 8)]
    out = YOLOv3Loss(3, img_size=64, flavor=flavor)(inputs, torch.zeros(0, 6))
    grads = torch.autograd.grad(out.total, inputs)
    assert float(out.total.detach()) == 0.0 and all(g.shape == x.shape for g, x in zip(grads, inputs))
    assert out.stats["num_pos"] == out.stats["num_ignored"] == out.stats["num_targets"] == 0
    for layer in out.stats["layers"]:
        if flavor == "darknet":
            assert layer["count"] == 0 and all(layer[k] is None for k in ("avg_iou", "class", "obj", "no_obj", "recall50"))
        else:
            assert layer["loss"] == 0.0 and layer["conf_obj"] is None and layer["conf_noobj"] is None
