"""torch.func.grad, vmap, double backward and targets that require grad, through the public functions.

torch.func.grad differentiates the plain path's autograd Function (it has setup_context) and must
give autograd's gradient; vmap runs each loss's formula (value checks read every batch entry at
once); create_graph=True and targets that require grad take their graphs from the formulas.
"""
from __future__ import annotations

import pytest
import torch

import detloss.functional as F

D = torch.float64


def _logits(shape=(5, 7), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=D) * 3
    x.view(-1)[:3] = torch.tensor([-60.0, 60.0, 0.0], dtype=D)
    t = (torch.rand(shape, generator=g, dtype=D) > 0.7).to(D)
    q = torch.rand(shape, generator=g, dtype=D) * t
    return x, t, q


def _boxes(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=D) * 10
    target = torch.cat([xy, xy + 1 + torch.rand(n, 2, generator=g, dtype=D) * 4], 1)
    pred = target + torch.randn(n, 4, generator=g, dtype=D) * 0.5
    return torch.cat([pred[:, :2], torch.maximum(pred[:, 2:], pred[:, :2])], 1), target


X, T, Q = _logits()
P, B = _boxes()
LOGIT_LOSSES = {
    "bce_with_logits": lambda a: F.bce_with_logits(a, Q, pos_weight=torch.full((7,), 2.0, dtype=D)),
    "sigmoid_focal_loss": lambda a: F.sigmoid_focal_loss(a, T, reduction="sum"),
    "quality_focal_loss": lambda a: F.quality_focal_loss(a, Q, gamma=1.5, alpha=0.25),
    "varifocal_loss": lambda a: F.varifocal_loss(a, Q, T),
    "bce_blur": lambda a: F.bce_blur(a, Q),
    "softmax_focal_loss": lambda a: F.softmax_focal_loss(a, T.argmax(1)),
    "cross_entropy": lambda a: F.cross_entropy(a, T.argmax(1), label_smoothing=0.1),
}
BOX_LOSSES = {
    f"iou_loss_{kind}_{conv}": (lambda a, k=kind, c=conv: F.iou_loss(a, B, kind=k, convention=c, reduction="sum"))
    for kind in ("iou", "giou", "diou", "ciou", "siou") for conv in ("torchvision", "yolov5")
}


def _autograd(fn, x):
    xr = x.clone().requires_grad_()
    fn(xr).backward()
    return xr.grad


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES) + sorted(BOX_LOSSES))
def test_torch_func_grad_equals_autograd(name):
    fn, x = (LOGIT_LOSSES[name], X) if name in LOGIT_LOSSES else (BOX_LOSSES[name], P)
    torch.testing.assert_close(torch.func.grad(fn)(x), _autograd(fn, x), rtol=1e-12, atol=0)


def test_torch_func_grad_keeps_the_exact_tiny_gradient():
    x = torch.tensor([-60.0, 60.0], dtype=D)
    y = torch.tensor([0.0, 1.0], dtype=D)
    g = torch.func.grad(lambda a: F.bce_with_logits(a, y, reduction="sum"))(x)
    s = torch.sigmoid(torch.tensor(-60.0, dtype=D))
    torch.testing.assert_close(g, torch.stack([s, -s]), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["bce_with_logits", "sigmoid_focal_loss", "quality_focal_loss", "varifocal_loss",
                                  "bce_blur", "cross_entropy"])
def test_vmap_equals_a_loop(name):
    rows = torch.stack([X, X.flip(0) * 0.5, X + 1])  # three batch entries of [5, 7] logits
    fn = LOGIT_LOSSES[name]
    torch.testing.assert_close(torch.func.vmap(fn)(rows), torch.stack([fn(r) for r in rows]), rtol=1e-12, atol=1e-14)
    per_sample = torch.func.vmap(torch.func.grad(fn))(rows)
    torch.testing.assert_close(per_sample, torch.stack([_autograd(fn, r) for r in rows]), rtol=1e-10, atol=1e-14)


def test_vmap_box_losses_equal_a_loop():
    preds = torch.stack([P, P + 0.25, P * 1.1])
    for name, fn in BOX_LOSSES.items():
        torch.testing.assert_close(torch.func.vmap(fn)(preds), torch.stack([fn(p) for p in preds]),
                                   rtol=1e-12, atol=1e-14, msg=name)
    fn = lambda a, b: F.pairwise_box_iou(a, b, kind="giou")  # noqa: E731
    torch.testing.assert_close(torch.func.vmap(fn)(preds, B.expand(3, 6, 4)), torch.stack([fn(p, B) for p in preds]))


def test_vmap_checks_every_batch_entry():
    targets = torch.stack([T, T * 2])  # the second entry holds 2s
    with pytest.raises(ValueError, match="target: expected values in"):
        torch.func.vmap(lambda a, y: F.sigmoid_focal_loss(a, y))(torch.stack([X, X]), targets)
    inverted = torch.stack([P, P[:, [2, 3, 0, 1]]])
    with pytest.raises(ValueError, match="pred: expected boxes with x2 >= x1"):
        torch.func.vmap(lambda a: F.iou_loss(a, B))(inverted)


@pytest.mark.parametrize("name", sorted(LOGIT_LOSSES) + ["iou_loss_giou_torchvision", "iou_loss_diou_yolov5"])
def test_double_backward(name):
    fn, x = (LOGIT_LOSSES[name], X) if name in LOGIT_LOSSES else (BOX_LOSSES[name], P)
    assert torch.autograd.gradgradcheck(fn, (x.clone().requires_grad_(),))


def test_double_backward_ciou_equals_the_formula():
    """CIoU holds its alpha constant (both originals), so its gradient is not the derivative that
    gradgradcheck's finite differences see; its Hessian-vector product is the formula's."""
    from detloss.functional.iou import _iou_loss_formula

    v = torch.rand_like(P)
    hvps = []
    for fn in (BOX_LOSSES["iou_loss_ciou_torchvision"], lambda a: _iou_loss_formula(a, B, "ciou", reduction="sum")):
        xr = P.clone().requires_grad_()
        (g,) = torch.autograd.grad(fn(xr), xr, create_graph=True)
        hvps.append(torch.autograd.grad((g * v).sum(), xr)[0])
    torch.testing.assert_close(hvps[0], hvps[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["quality_focal_loss", "varifocal_score", "bce_blur", "sigmoid_focal_loss"])
def test_targets_that_require_grad(name):
    """gradcheck over the logits and the soft target together (the target's gradient comes from
    the formula, the logits' from the closed form)."""
    x = X.clone().requires_grad_()
    y = (0.05 + 0.9 * Q.clone()).requires_grad_()
    fns = {
        "quality_focal_loss": lambda a, b: F.quality_focal_loss(a, b, reduction="sum"),
        "varifocal_score": lambda a, b: F.varifocal_loss(a, b, T, reduction="sum"),
        "bce_blur": lambda a, b: F.bce_blur(a, b),
        "sigmoid_focal_loss": lambda a, b: F.sigmoid_focal_loss(a, b, gamma=1.5, reduction="mean"),
    }
    assert torch.autograd.gradcheck(fns[name], (x, y))


def test_box_target_that_requires_grad():
    pred, target = P.clone().requires_grad_(), B.clone().requires_grad_()
    for kind in ("iou", "giou", "diou"):
        assert torch.autograd.gradcheck(lambda a, b: F.iou_loss(a, b, kind=kind), (pred, target))
