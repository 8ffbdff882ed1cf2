"""Bad input raises ValueError / TypeError naming the argument, what was expected and what came."""
from __future__ import annotations

import pytest
import torch

import detloss.functional as F

X = torch.zeros(2, 3)


def raises(exc, *fragments):
    """pytest.raises whose message must contain every fragment."""
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            out = self.cm.__exit__(*a)
            msg = str(self.info.value)
            for f in fragments:
                assert f in msg, f"{f!r} not in {msg!r}"
            return out
    return _Ctx()


@pytest.mark.parametrize("fn", [F.bce_with_logits, F.binary_cross_entropy, F.bce_blur, F.sigmoid_focal_loss,
                                F.quality_focal_loss, F.smooth_l1_loss, F.l1_loss, F.mse_loss])
def test_mismatched_shapes(fn):
    with raises(ValueError, "target", "(2, 3)", "(3, 2)"):
        fn(X, torch.zeros(3, 2))


def test_no_silent_broadcast_of_target():
    with raises(ValueError, "target", "(2, 3)", "(1, 3)"):
        F.bce_with_logits(X, torch.zeros(1, 3))


@pytest.mark.parametrize("fn", [F.bce_with_logits, F.sigmoid_focal_loss, F.quality_focal_loss, F.bce_blur,
                                F.smooth_l1_loss, F.l1_loss, F.mse_loss, F.binary_cross_entropy])
def test_integer_logits(fn):
    with raises(TypeError, "input", "floating", "torch.int64"):
        fn(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


def test_integer_logits_cross_entropy():
    with raises(TypeError, "input", "torch.int64"):
        F.cross_entropy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_not_a_tensor():
    with raises(TypeError, "target", "torch.Tensor", "list"):
        F.bce_with_logits(X, [[0.0] * 3] * 2)


def test_pos_weight_not_broadcastable():
    with raises(ValueError, "pos_weight", "(2, 3)", "(4,)"):
        F.bce_with_logits(X, X, pos_weight=torch.ones(4))
    with raises(ValueError, "weight", "(2, 3)", "(2, 3, 1)"):
        F.bce_with_logits(X, X, weight=torch.ones(2, 3, 1))


def test_probabilities_out_of_range():
    with raises(ValueError, "input", "[0.0, 1.0]", "1.5", "(1, 2)"):
        F.binary_cross_entropy(torch.tensor([[0.1, 0.2, 0.3], [0.1, 0.2, 1.5]]), X)


def test_focal_target_out_of_range():
    with raises(ValueError, "target", "2", "(0, 1)"):
        F.sigmoid_focal_loss(X, torch.tensor([[0.0, 2.0, 0.0], [0.0, 0.0, 0.0]]))


@pytest.mark.parametrize("bad,pos", [(3, "(1,)"), (-1, "(1,)")])
def test_class_index_out_of_range(bad, pos):
    with raises(ValueError, "target", "[0, 2]", str(bad), pos):
        F.cross_entropy(X, torch.tensor([0, bad]))
    with raises(ValueError, "target", "[0, 2]", str(bad)):
        F.softmax_focal_loss(X, torch.tensor([0, bad]))


def test_class_target_shape_and_dtype():
    with raises(ValueError, "target", "(2,)", "(3,)"):
        F.cross_entropy(X, torch.tensor([0, 1, 2]))
    with raises(TypeError, "target", "integer", "torch.bool"):
        F.cross_entropy(X, torch.tensor([True, False]))
    with raises(ValueError, "target", "probabilities", "(2, 2)"):
        F.cross_entropy(X, torch.zeros(2, 2))
    with raises(ValueError, "weight", "(3,)", "(2,)"):
        F.cross_entropy(X, torch.tensor([0, 1]), weight=torch.ones(2))
    with raises(ValueError, "label_smoothing", "1.5"):
        F.cross_entropy(X, torch.tensor([0, 1]), label_smoothing=1.5)


@pytest.mark.parametrize("call", [
    lambda r: F.bce_with_logits(X, X, reduction=r),
    lambda r: F.cross_entropy(X, torch.tensor([0, 1]), reduction=r),
    lambda r: F.sigmoid_focal_loss(X, X, reduction=r),
    lambda r: F.iou_loss(torch.tensor([[0.0, 0, 1, 1]]), torch.tensor([[0.0, 0, 1, 1]]), reduction=r),
    lambda r: F.distribution_focal_loss(torch.zeros(2, 4), torch.zeros(2), reduction=r),
    lambda r: F.smooth_l1_loss(X, X, reduction=r),
])
def test_unknown_reduction(call):
    with raises(ValueError, "reduction", "'none'", "'avg'"):
        call("avg")


def test_unknown_kind_format_convention():
    b = torch.tensor([[0.0, 0, 1, 1]])
    with raises(ValueError, "kind", "'giou'", "'wiou'"):
        F.iou_loss(b, b, kind="wiou")
    with raises(ValueError, "box_format", "'xywh'"):
        F.aligned_box_iou(b, b, box_format="xywh")
    with raises(ValueError, "convention", "'mmdet'"):
        F.aligned_box_iou(b, b, convention="mmdet")
    with raises(ValueError, "kind", "'wiou'"):
        __import__("detloss.nn").nn.IoULoss(kind="wiou")


@pytest.mark.parametrize("fn", [F.aligned_box_iou, F.iou_loss, F.pairwise_box_iou])
def test_negative_box_size_forbidden(fn):
    good = torch.tensor([[0.0, 0, 1, 1], [0.0, 0, 2, 2]])
    bad = torch.tensor([[0.0, 0, 1, 1], [2.0, 0, 1, 2]])  # x2 < x1 in row 1
    name = "target" if fn is F.iou_loss else "boxes2"
    with raises(ValueError, name, "x2 >= x1", "(1,)", "[2.0, 0.0, 1.0, 2.0]"):
        fn(good, bad)
    with raises(ValueError, "w >= 0", "(1,)"):
        fn(good, torch.tensor([[0.0, 0, 1, 1], [0.0, 0, 1, -1]]), box_format="cxcywh")


def test_box_shapes():
    with raises(ValueError, "boxes1", "[..., 4]", "(2, 3)"):
        F.aligned_box_iou(X, X)
    with raises(ValueError, "boxes2", "(2, 4)", "(3, 4)"):
        F.aligned_box_iou(torch.zeros(2, 4), torch.zeros(3, 4))
    with raises(ValueError, "boxes1", "[N, 4]", "(1, 2, 4)"):
        F.pairwise_box_iou(torch.zeros(1, 2, 4), torch.zeros(3, 4))
    with raises(TypeError, "pred", "torch.int64"):
        F.iou_loss(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4))


def test_dfl_bad_input():
    with raises(ValueError, "pred_dist", "[n, bins]", "(8,)"):
        F.distribution_focal_loss(torch.zeros(8), torch.zeros(8))
    with raises(ValueError, "target", "(2,)", "(3,)"):
        F.distribution_focal_loss(torch.zeros(2, 8), torch.zeros(3))
    with raises(ValueError, "target", "[0.0, 7.0]", "7.5", "(1,)"):
        F.distribution_focal_loss(torch.zeros(2, 8), torch.tensor([1.0, 7.5]))
    with raises(ValueError, "target", "-0.5"):
        F.distribution_focal_loss(torch.zeros(2, 8), torch.tensor([-0.5, 1.0]))


def test_hyperparameters():
    with raises(ValueError, "gamma", "-1"):
        F.sigmoid_focal_loss(X, X, gamma=-1)
    with raises(ValueError, "beta", "-1"):
        F.smooth_l1_loss(X, X, beta=-1)
    with raises(ValueError, "alpha"):
        F.bce_blur(X, X, alpha=0)
    with raises(ValueError, "eps", "2"):
        F.smooth_bce(2)


@pytest.mark.parametrize("bad", [2.0, 0.5, -1.0, 1e-45, 1.0 - 2.0**-24, 1.0 + 2.0**-23, 1e30, float("inf"),
                                 float("nan")])
def test_varifocal_labels_must_be_zero_or_one(bad):
    # the smallest float32 subnormal, the neighbours of 1, a product that overflows, inf and NaN
    # are all caught by the arithmetic test (t (t - 1) != 0) as well as by the comparisons
    score = torch.full((2, 3), 0.5)
    label = torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, bad]])
    with raises(ValueError, "label", "0 or 1", f"{float(label[1, 2]):.9g}", "(1, 2)"):
        F.varifocal_loss(X, score, label)
    F.varifocal_loss(X, score, torch.tensor([[0, 1, 0], [1, 0, 0]]))  # integer and bool labels are fine
    F.varifocal_loss(X, score, torch.tensor([[False, True, False], [True, False, False]]))
    F.varifocal_loss(X, score, torch.tensor([[-0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))  # -0.0 is 0


@pytest.mark.parametrize("bad", [-0.5, 1.5, float("-inf"), float("nan")])
def test_bce_blur_targets_in_unit_interval(bad):
    target = torch.tensor([[0.0, 1.0, 0.5], [bad, 0.0, 0.0]])
    with raises(ValueError, "target", "[0.0, 1.0]", "(1, 0)"):
        F.bce_blur(X, target)


def test_binary_cross_entropy_target_out_of_range_is_detloss_error():
    """torch raises its own RuntimeError for targets outside [0, 1]; detloss names the argument."""
    with raises(ValueError, "target", "[0.0, 1.0]", "2", "(0, 1)"):
        F.binary_cross_entropy(torch.full((2, 3), 0.5), torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 0.0]]))


@pytest.mark.parametrize("alpha", [2.0, float("nan"), -0.5, 1.0001, float("inf")])
def test_focal_alpha_follows_torchvision(alpha):
    """torchvision.ops.sigmoid_focal_loss accepts alpha in [0, 1] or -1 ("disabled")."""
    with raises(ValueError, "alpha", "[0, 1]", "-1"):
        F.sigmoid_focal_loss(X, X, alpha=alpha)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -1.0, 0.25])
def test_focal_alpha_accepted_values(alpha):
    assert torch.isfinite(F.sigmoid_focal_loss(X, X, alpha=alpha)).all()


@pytest.mark.parametrize("alpha", [-1.0, 1.5, float("nan")])
def test_other_alphas_in_unit_interval(alpha):
    score = torch.full((2, 3), 0.5)
    with raises(ValueError, "alpha", "[0, 1]"):
        F.varifocal_loss(X, score, torch.zeros(2, 3), alpha=alpha)
    with raises(ValueError, "alpha", "[0, 1]"):
        F.quality_focal_loss(X, score, alpha=alpha)
    with raises(ValueError, "alpha", "[0, 1]"):
        F.softmax_focal_loss(X, torch.tensor([0, 1]), alpha=alpha)


@pytest.mark.parametrize(
    "shape, to, ok",
    [((4,), (3, 4), True), ((3, 1), (3, 4), True), ((), (3, 4), True), ((1, 1, 4), (3, 4), False),
     ((3, 4), (1, 4), False), ((2,), (3, 4), False), ((0,), (3, 0), True), ((0,), (3, 1), False)],
)
def test_broadcast_rule_equals_torch(shape, to, ok):
    """detloss's plain-Python broadcast rule agrees with torch.broadcast_shapes."""
    from detloss._checks import broadcasts_to

    try:
        torch_ok = torch.broadcast_shapes(shape, to) == torch.Size(to)
    except RuntimeError:
        torch_ok = False
    assert broadcasts_to(shape, to) is ok is torch_ok


def test_broadcast_check_does_not_import_sympy():
    """torch.broadcast_shapes imports sympy on its first call (a stall of seconds); the weight
    check of a loss must not."""
    import subprocess
    import sys

    code = (
        "import sys, torch, detloss.functional as F\n"
        "F.bce_with_logits(torch.randn(3, 4), torch.rand(3, 4), weight=torch.ones(4))\n"
        "F.sigmoid_focal_loss(torch.randn(3, 4), torch.rand(3, 4), pos_weight=torch.ones(4))\n"
        "print('sympy' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
