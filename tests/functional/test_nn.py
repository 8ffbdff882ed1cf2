"""The nn.Module twins give exactly the functional results and carry their tensors as buffers."""
from __future__ import annotations

import torch

import detloss.functional as F
import detloss.nn as N


def test_modules_match_functional():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, generator=g)
    y = torch.rand(4, 5, generator=g)
    p = torch.rand(4, 5, generator=g)
    w, pw = torch.rand(5, generator=g), torch.rand(5, generator=g)
    t = torch.tensor([0, 4, 2, -100])
    b1 = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 4]])
    b2 = torch.tensor([[1.0, 1, 3, 3], [0, 0, 2, 5]])
    lab = (y > 0.5).float()
    pairs = [
        (N.BCELoss(weight=w)(p, y), F.binary_cross_entropy(p, y, weight=w)),
        (N.BCEWithLogitsLoss(weight=w, pos_weight=pw, reduction="sum")(x, y), F.bce_with_logits(x, y, weight=w, pos_weight=pw, reduction="sum")),
        (N.BCEBlurWithLogitsLoss(alpha=0.1)(x, y), F.bce_blur(x, y, alpha=0.1)),
        (N.CrossEntropyLoss(weight=w, label_smoothing=0.1)(x, t), F.cross_entropy(x, t, weight=w, label_smoothing=0.1)),
        (N.SigmoidFocalLoss(alpha=0.5, gamma=1.5, reduction="mean")(x, y), F.sigmoid_focal_loss(x, y, alpha=0.5, gamma=1.5, reduction="mean")),
        (N.SoftmaxFocalLoss(weight=w)(x, t), F.softmax_focal_loss(x, t, weight=w)),
        (N.QualityFocalLoss(gamma=1.5, alpha=0.25)(x, y), F.quality_focal_loss(x, y, gamma=1.5, alpha=0.25)),
        (N.VarifocalLoss()(x, y, lab), F.varifocal_loss(x, y, lab)),
        (N.SmoothL1Loss(beta=0.5)(x, y), F.smooth_l1_loss(x, y, beta=0.5)),
        (N.L1Loss(reduction="sum")(x, y), F.l1_loss(x, y, reduction="sum")),
        (N.MSELoss()(x, y), F.mse_loss(x, y)),
        (N.IoULoss(kind="ciou", convention="yolov5")(b1, b2), F.iou_loss(b1, b2, kind="ciou", convention="yolov5")),
        (N.DistributionFocalLoss(reduction="none")(x, y[:, 0] * 4), F.distribution_focal_loss(x, y[:, 0] * 4, reduction="none")),
    ]
    for got, expected in pairs:
        assert torch.equal(got, expected)


def test_buffers_follow_dtype_and_state_dict():
    m = N.BCEWithLogitsLoss(pos_weight=torch.ones(3)).double()
    assert m.pos_weight.dtype == torch.float64
    assert "pos_weight" in m.state_dict()
    assert "reduction='mean'" in repr(m)


def test_hyperparameters_are_keyword_only():
    """A positional hyperparameter is a TypeError, never a silent swap (quality_focal_loss takes
    gamma first, sigmoid_focal_loss alpha first: positionally 0.25, 2.0 would mean different things)."""
    import inspect

    import pytest

    x, y = torch.zeros(2, 3), torch.full((2, 3), 0.5)
    with pytest.raises(TypeError):
        F.quality_focal_loss(x, y, 0.25, 2.0)
    with pytest.raises(TypeError):
        F.sigmoid_focal_loss(x, y, 0.25, 2.0)
    with pytest.raises(TypeError):
        N.SigmoidFocalLoss(0.25, 2.0)
    for name in F.__all__:
        fn = getattr(F, name)
        params = list(inspect.signature(fn).parameters.values())
        if name == "smooth_bce":
            continue
        # the data tensors lead, without defaults; every option after them is keyword-only
        tensors = next((i for i, p in enumerate(params) if p.kind is not p.POSITIONAL_OR_KEYWORD
                        or p.default is not p.empty), len(params))
        assert 1 <= tensors <= 3, name
        assert all(p.kind is p.KEYWORD_ONLY for p in params[tensors:]), name
    for name in N.__all__:
        params = list(inspect.signature(getattr(N, name).__init__).parameters.values())[1:]
        assert all(p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) for p in params), name


def test_box_iou_has_torchvision_meaning():
    """``box_iou`` is the pairwise matrix (torchvision.ops.box_iou), even when N == M; the IoU of
    aligned pairs is ``aligned_box_iou``."""
    a = torch.tensor([[0.0, 0, 2, 2], [1, 1, 3, 3]])
    b = torch.tensor([[0.0, 0, 2, 2], [0, 0, 1, 1]])
    m = F.box_iou(a, b)
    assert m.shape == (2, 2)
    inter = torch.tensor([[4.0, 1.0], [1.0, 0.0]])
    union = torch.tensor([[4.0, 4.0], [7.0, 5.0]])
    torch.testing.assert_close(m, inter / union)
    torch.testing.assert_close(F.aligned_box_iou(a, b), torch.tensor([1.0, 0.0]))


#: Each loss of detloss.functional and its module; the functional's tensor arguments that the
#: module takes in forward rather than in __init__.
TWINS = {
    "binary_cross_entropy": ("BCELoss", ()),
    "bce_with_logits": ("BCEWithLogitsLoss", ()),
    "bce_blur": ("BCEBlurWithLogitsLoss", ()),
    "cross_entropy": ("CrossEntropyLoss", ()),
    "sigmoid_focal_loss": ("SigmoidFocalLoss", ()),
    "softmax_focal_loss": ("SoftmaxFocalLoss", ()),
    "quality_focal_loss": ("QualityFocalLoss", ()),
    "varifocal_loss": ("VarifocalLoss", ()),
    "smooth_l1_loss": ("SmoothL1Loss", ()),
    "l1_loss": ("L1Loss", ()),
    "mse_loss": ("MSELoss", ()),
    "iou_loss": ("IoULoss", ()),
    "distribution_focal_loss": ("DistributionFocalLoss", ("weight",)),
    "probiou_loss": ("ProbIoULoss", ("weight",)),
    "rotated_angle_loss": ("RotatedAngleLoss", ("target_wh", "weight")),
    "keypoint_loss": ("KeypointLoss", ("visible", "area")),
    "rle_loss": ("RLELoss", ("sigma_logit", "weight")),
    "cropped_mask_bce": ("CroppedMaskBCELoss", ("boxes", "area")),
    "bce_dice_loss": ("BCEDiceLoss", ()),
}
#: Functions that are not losses (IoU values, box and keypoint geometry, the flow's density), or
#: losses used inside another one without a module of their own.
NOT_LOSSES = {
    "smooth_bce", "aligned_box_iou", "box_iou", "pairwise_box_iou", "keypoint_similarity",
    "object_keypoint_similarity", "realnvp_log_prob", "crop_mask", "dice_loss", "prototype_mask_bce",
    "dist_to_rbox", "probiou", "rbox_covariance", "rbox_to_dist", "xywhr_to_corners",
}
#: Modules that are not a loss's twin (the flow model of YOLO26's pose head).
NOT_TWINS = {"RealNVP"}
#: Options a function has and its module replaces: ``validate`` (internal callers skip the box
#: check), RLE's ``log_prob`` (the module holds the flow itself) and ``sigma_in_float32`` (a
#: reference's rounding, set by the pose loss).
FUNCTION_ONLY = {"validate", "log_prob", "sigma_in_float32", "flow"}


def test_every_functional_loss_has_its_module_with_the_same_options():
    """Every loss in detloss.functional has an nn twin whose constructor takes each of its keyword
    options (same name, same default), tensors included as buffers."""
    import inspect

    assert set(F.__all__) == set(TWINS) | NOT_LOSSES
    assert {m for m, _ in TWINS.values()} == set(N.__all__) - NOT_TWINS
    for fname, (mname, in_forward) in TWINS.items():
        fparams = {p.name: p for p in inspect.signature(getattr(F, fname)).parameters.values()
                   if p.kind is p.KEYWORD_ONLY and p.name not in in_forward and p.name not in FUNCTION_ONLY}
        mparams = {p.name: p for p in inspect.signature(getattr(N, mname).__init__).parameters.values()
                   if p.kind is p.KEYWORD_ONLY and p.name not in FUNCTION_ONLY}
        assert set(fparams) == set(mparams), (fname, set(fparams) ^ set(mparams))
        for name, p in fparams.items():
            # a tensor the function requires may have the original's default in the module
            required = p.default is inspect.Parameter.empty
            assert required or mparams[name].default == p.default or (p.default != p.default), (fname, name)
        fwd = list(inspect.signature(getattr(N, mname).forward).parameters)[1:]
        assert all(a in fwd for a in in_forward), (mname, fwd)


def test_new_module_options_reach_the_function():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g)
    y = (torch.rand(4, 5, generator=g) > 0.5).float()
    pw = torch.linspace(0.5, 2.0, 5)
    m = N.SigmoidFocalLoss(gamma=1.5, pos_weight=pw, reduction="sum")
    assert "pos_weight" in m.state_dict()
    assert torch.equal(m(x, y), F.sigmoid_focal_loss(x, y, gamma=1.5, pos_weight=pw, reduction="sum"))
    inverted = torch.tensor([[2.0, 2.0, 0.0, 1.0]])
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    assert torch.equal(N.IoULoss(validate=False)(inverted, box), F.iou_loss(inverted, box, validate=False))
    import pytest

    with pytest.raises(ValueError, match="pred"):
        N.IoULoss()(inverted, box)
