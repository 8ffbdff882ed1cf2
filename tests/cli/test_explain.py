"""``detloss explain``: the result is detloss.functional's, the worked steps reproduce it, the
worked examples print the numbers computed by hand, ``--json`` carries the same data and
``--expect`` diagnoses a wrong claim (the focal table of seed 001 prints 0.4181 for logit 0.8,
target 1, which is the value of the target-0 branch)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import detloss.functional as DF
from detloss import HungarianMatcher
from detloss.tools.cli import main
from detloss.tools.explain import LOSSES, explain


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def run_cli(capsys, *argv):
    rc = main(["explain", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


# ----------------------------------------------------------------------------- worked examples
def test_bce_with_logits_worked_example(capsys):
    x, y = [0.7, 0.2, 0.1], [1.0, 0.0, 0.0]
    rc, out, _ = run_cli(capsys, "bce-with-logits", "--input", "0.7,0.2,0.1", "--target", "1,0,0")
    assert rc == 0
    p = [sig(v) for v in x]
    terms = [-math.log(p[0]), -math.log(1 - p[1]), -math.log(1 - p[2])]
    mean = sum(terms) / 3
    # numbers computed here by hand, printed to 4 places
    for v in p + terms + [mean] + [(pi - yi) / 3 for pi, yi in zip(p, y)]:
        assert f"{v:.4f}" in out
    assert "0.6682" in out and "0.5498" in out and "0.5250" in out and "0.6486" in out
    assert "-log(0.6682)" in out and "-log(1 - 0.5498)" in out
    e = explain("bce-with-logits", x, y)
    assert torch.equal(e.result, DF.bce_with_logits(torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)))
    assert e.steps[0].values.tolist() == pytest.approx(p, abs=1e-15)
    assert e.gradient.tolist() == pytest.approx([(pi - yi) / 3 for pi, yi in zip(p, y)], abs=1e-12)


def test_focal_steps_by_hand():
    e = explain("focal", [0.8, -1.2], [1.0, 0.0])
    p = [sig(0.8), sig(-1.2)]
    steps = {s.symbol: s.values.tolist() for s in e.steps}
    assert steps["p_t"] == pytest.approx([p[0], 1 - p[1]])
    assert steps["alpha_t"] == pytest.approx([0.25, 0.75])
    assert steps["(1 - p_t)^gamma"] == pytest.approx([(1 - p[0]) ** 2, p[1] ** 2])
    want = [-0.25 * (1 - p[0]) ** 2 * math.log(p[0]), -0.75 * p[1] ** 2 * math.log(1 - p[1])]
    assert e.result.tolist() == pytest.approx(want, rel=1e-12)
    assert f"{want[0]:.4f}" == "0.0089"


def test_cross_entropy_log_sum_exp_smoothing_soft():
    x = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 3.0]], dtype=torch.float64)
    e = explain("cross-entropy", x, [0, 2], label_smoothing=0.1)
    steps = {s.symbol: s.values for s in e.steps}
    assert torch.allclose(steps["lse"], torch.logsumexp(x, -1))
    assert torch.allclose(steps["t'"], torch.tensor([[0.9 + 0.1 / 3, 0.1 / 3, 0.1 / 3], [0.1 / 3, 0.1 / 3, 0.9 + 0.1 / 3]], dtype=torch.float64))
    ref = torch.nn.functional.cross_entropy(x, torch.tensor([0, 2]), label_smoothing=0.1)
    assert float(e.result) == pytest.approx(float(ref), rel=1e-12)
    soft = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]], dtype=torch.float64)
    es = explain("cross-entropy", x, soft)
    assert es.consistent
    assert float(es.result) == pytest.approx(float(-(soft * torch.log_softmax(x, -1)).sum(-1).mean()), rel=1e-12)
    assert any("soft targets" in s.formula for s in es.steps)


def test_smooth_l1_branch_named():
    e = explain("smooth-l1", [0.5, 3.0], [0.0, 0.0], beta=1.0, reduction="none")
    d = e.steps[-1].details
    assert "< beta" in d[0] and "0.5 * d^2 / beta = 0.1250" in d[0]
    assert ">= beta" in d[1] and "= 2.5000" in d[1]
    assert e.result.tolist() == [0.125, 2.5]


@pytest.mark.parametrize("convention", ["torchvision", "yolov5"])
def test_ciou_terms_by_hand(convention):
    a, b = [0.0, 0.0, 4.0, 2.0], [1.0, 0.0, 3.0, 4.0]
    e = explain("ciou", a, b, convention=convention)
    s = {st_.symbol: float(st_.values) for st_ in e.steps}
    iou = 4.0 / 12.0  # intersection 2 x 2, union 8 + 8 - 4
    rho2, c2 = 1.0, 32.0  # centres (2, 1) and (2, 2); enclosing box 4 x 4
    v = 4 / math.pi ** 2 * (math.atan(2 / 4) - math.atan(4 / 2)) ** 2
    alpha = v / (1 - iou + v)
    assert s["IoU"] == pytest.approx(iou, rel=1e-6)
    assert s["rho^2 / c^2"] == pytest.approx(rho2 / c2, rel=1e-6)
    assert s["v"] == pytest.approx(v, rel=1e-6)
    assert s["alpha"] == pytest.approx(alpha, rel=1e-6)
    assert float(e.result) == pytest.approx(1 - (iou - rho2 / c2 - alpha * v), rel=1e-6)
    assert torch.equal(e.result, DF.iou_loss(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                                             kind="ciou", convention=convention))


def test_eiou_and_siou_terms_by_hand():
    a, b = [0.0, 0.0, 4.0, 2.0], [1.0, 0.0, 3.0, 4.0]  # centres (2, 1), (2, 2); enclosing box 4 x 4
    iou = 4.0 / 12.0
    e = explain("eiou", a, b)
    s = {st_.symbol: float(st_.values) for st_ in e.steps}
    # EIoU = IoU - rho^2 / c^2 - (w_a - w_b)^2 / C_w^2 - (h_a - h_b)^2 / C_h^2
    assert s["rho^2 / c^2"] == pytest.approx(1.0 / 32.0, rel=1e-6)
    assert s["(w_a - w_b)^2 / C_w^2"] == pytest.approx((4 - 2) ** 2 / 16, rel=1e-6)
    assert s["(h_a - h_b)^2 / C_h^2"] == pytest.approx((2 - 4) ** 2 / 16, rel=1e-6)
    assert float(e.result) == pytest.approx(1 - (iou - 1 / 32 - 0.25 - 0.25), rel=1e-6)
    e = explain("siou", a, b)
    s = {st_.symbol: float(st_.values) for st_ in e.steps}
    # centres differ along y only: angle cost 0, so gamma = 2; rho_y = (1 / 4)^2, rho_x = 0
    delta = 1 - math.exp(-2 * (1 / 4) ** 2)
    omega = 2 * (1 - math.exp(-(2 / 4))) ** 4  # |4 - 2| / 4 for the widths and for the heights
    assert s["Lambda"] == pytest.approx(0.0, abs=1e-12)
    assert s["Delta"] == pytest.approx(delta, rel=1e-6)
    assert s["Omega"] == pytest.approx(omega, rel=1e-6)
    assert float(e.result) == pytest.approx(1 - (iou - 0.5 * (delta + omega)), rel=1e-6)
    assert e.consistent


def test_dfl_two_bins_by_hand():
    logits = [0.5, 1.0, -0.3, 2.0, 0.0]
    e = explain("dfl", logits, [2.3])
    lsm = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), 0).tolist()
    assert float(e.result) == pytest.approx(-(0.7 * lsm[2] + 0.3 * lsm[3]), rel=1e-12)
    assert e.consistent


# ----------------------------------------------------------------------------- every loss
g = torch.Generator().manual_seed(0)


def _r(*shape, lo=-3.0, hi=3.0):
    return torch.rand(*shape, generator=g, dtype=torch.float64) * (hi - lo) + lo


def _boxes(n):
    xy = _r(n, 2, lo=0, hi=10)
    wh = _r(n, 2, lo=0.5, hi=6)
    return torch.cat((xy, xy + wh), -1)


X = _r(2, 3)
Y01 = (torch.rand(2, 3, generator=g) > 0.5).double()
YS = torch.rand(2, 3, generator=g, dtype=torch.float64)
P = _r(2, 3, lo=0.02, hi=0.98)
BA, BB = _boxes(4), _boxes(4)
DL, DT = _r(3, 8), _r(3, lo=0.0, hi=6.9)
MQ = torch.cat((_r(4, 3), _r(4, 2, lo=0.3, hi=0.7), _r(4, 2, lo=0.1, hi=0.3)), 1)  # logits, cx cy w h
MT = torch.tensor([[2, 0.4, 0.5, 0.2, 0.3], [0, 0.6, 0.4, 0.1, 0.2]], dtype=torch.float64)

CASES = [
    ("bce-with-logits", X, Y01, {}, lambda: DF.bce_with_logits(X, Y01)),
    ("bce-with-logits", X, YS, {"pos_weight": [2.0, 1.0, 0.5], "reduction": "sum"},
     lambda: DF.bce_with_logits(X, YS, pos_weight=torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64), reduction="sum")),
    ("bce-with-logits", X, Y01, {"weight": [[1.0, 2.0, 3.0]], "reduction": "none"},
     lambda: DF.bce_with_logits(X, Y01, weight=torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64), reduction="none")),
    ("bce", P, YS, {}, lambda: DF.binary_cross_entropy(P, YS)),
    ("cross-entropy", X, torch.tensor([2, 0]), {}, lambda: DF.cross_entropy(X, torch.tensor([2, 0]))),
    ("cross-entropy", X, torch.tensor([2, -100]), {"reduction": "mean"}, lambda: DF.cross_entropy(X, torch.tensor([2, -100]))),
    ("cross-entropy", X, torch.tensor([1, 2]), {"weight": [0.2, 1.0, 3.0], "label_smoothing": 0.2},
     lambda: DF.cross_entropy(X, torch.tensor([1, 2]), weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64), label_smoothing=0.2)),
    ("cross-entropy", X, torch.softmax(YS, -1), {"label_smoothing": 0.1},
     lambda: DF.cross_entropy(X, torch.softmax(YS, -1), label_smoothing=0.1)),
    ("focal", X, Y01, {}, lambda: DF.sigmoid_focal_loss(X, Y01)),
    ("focal", X, YS, {"alpha": -1, "gamma": 1.5, "reduction": "mean"},
     lambda: DF.sigmoid_focal_loss(X, YS, alpha=-1, gamma=1.5, reduction="mean")),
    ("softmax-focal", X, torch.tensor([2, 1]), {"gamma": 1.0}, lambda: DF.softmax_focal_loss(X, torch.tensor([2, 1]), gamma=1.0)),
    ("qfl", X, YS, {}, lambda: DF.quality_focal_loss(X, YS)),
    ("qfl", X, YS, {"alpha": 0.25, "gamma": 1.5, "reduction": "sum"},
     lambda: DF.quality_focal_loss(X, YS, alpha=0.25, gamma=1.5, reduction="sum")),
    ("varifocal", X, YS * Y01, {"label": Y01}, lambda: DF.varifocal_loss(X, YS * Y01, Y01)),
    ("bce-blur", X, Y01, {}, lambda: DF.bce_blur(X, Y01)),
    ("smooth-l1", X, YS, {"beta": 0.5}, lambda: DF.smooth_l1_loss(X, YS, beta=0.5)),
    ("l1", X, YS, {"reduction": "sum"}, lambda: DF.l1_loss(X, YS, reduction="sum")),
    ("mse", X, YS, {}, lambda: DF.mse_loss(X, YS)),
    ("iou", BA, BB, {}, lambda: DF.iou_loss(BA, BB, kind="iou")),
    ("giou", BA, BB, {"reduction": "mean"}, lambda: DF.iou_loss(BA, BB, kind="giou", reduction="mean")),
    ("diou", BA, BB, {"convention": "yolov5"}, lambda: DF.iou_loss(BA, BB, kind="diou", convention="yolov5")),
    ("ciou", BA, BB, {}, lambda: DF.iou_loss(BA, BB, kind="ciou")),
    ("iou-loss", BA, BB, {"kind": "giou", "convention": "yolov5"}, lambda: DF.iou_loss(BA, BB, kind="giou", convention="yolov5")),
    ("eiou", BA, BB, {}, lambda: DF.iou_loss(BA, BB, kind="eiou")),
    ("siou", BA, BB, {"convention": "yolov5", "box_format": "cxcywh"},
     lambda: DF.iou_loss(BA, BB, kind="siou", convention="yolov5", box_format="cxcywh")),
    ("ciou", BA, BB, {"convention": "yolov5", "box_format": "cxcywh"},
     lambda: DF.iou_loss(BA, BB, kind="ciou", convention="yolov5", box_format="cxcywh")),
    ("dfl", DL, DT, {}, lambda: DF.distribution_focal_loss(DL, DT)),
    ("matching-cost", MQ, MT, {"use_focal": True}, lambda: HungarianMatcher(use_focal=True).cost_terms(
        {"pred_logits": MQ[None, :, :3], "pred_boxes": MQ[None, :, 3:]},
        [{"labels": MT[:, 0].long(), "boxes": MT[:, 1:]}])[0]["total"]),
]


@pytest.mark.parametrize("name,x,y,opts,ref", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_result_is_functional_and_steps_reproduce_it(name, x, y, opts, ref):
    e = explain(name, x, y, **opts)
    want = ref()
    assert torch.equal(e.result, want.detach())
    assert e.consistent, (e.elementwise, e.result)
    # the gradient is autograd's through the functional loss
    xg = x.clone().requires_grad_(True)
    e2 = explain(name, xg, y, **opts)
    assert torch.equal(e2.gradient, e.gradient)
    if e.gradient_formula is not None:
        assert torch.allclose(e.gradient_formula.values, e.gradient, rtol=1e-9, atol=1e-12)
    assert e.render()  # renders without error
    json.dumps(e.to_dict())


def test_every_loss_covered():
    covered = {c[0] for c in CASES}
    from detloss.tools.explain import ALIASES

    covered |= {ALIASES[c][0] for c in covered if c in ALIASES}
    assert set(LOSSES) <= covered


@settings(max_examples=20, deadline=None)
@given(
    st.lists(st.floats(-30, 30), min_size=1, max_size=6),
    st.floats(0, 1),
    st.one_of(st.floats(0, 1), st.just(-1.0)),  # torchvision's alpha: [0, 1], or -1 for none
    st.floats(0, 4),
    st.sampled_from(["none", "mean", "sum"]),
)
def test_focal_property(xs, y0, alpha, gamma, reduction):
    x = torch.tensor(xs, dtype=torch.float64)
    y = torch.full_like(x, y0)
    e = explain("focal", x, y, alpha=alpha, gamma=gamma, reduction=reduction)
    assert torch.equal(e.result, DF.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma, reduction=reduction))
    assert torch.isfinite(e.result).all() and torch.isfinite(e.gradient).all()
    assert torch.allclose(e.elementwise.sum(), DF.sigmoid_focal_loss(x, y, alpha=alpha, gamma=gamma).sum(), rtol=1e-9, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 4), st.integers(2, 5), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_cross_entropy_property(n, c, eps, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=gen, dtype=torch.float64) * 5
    y = torch.randint(0, c, (n,), generator=gen)
    e = explain("cross-entropy", x, y, label_smoothing=eps)
    assert torch.equal(e.result, DF.cross_entropy(x, y, label_smoothing=eps))
    assert e.consistent
    assert torch.allclose(e.gradient_formula.values, e.gradient, atol=1e-12)


def test_half_input_computed_in_float32():
    x = torch.tensor([0.7, 0.2, 0.1], dtype=torch.float16)
    e = explain("bce-with-logits", x, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float16))
    assert e.result.dtype == torch.float32 and e.gradient.dtype == torch.float16
    assert e.consistent


# ----------------------------------------------------------------------------- --json
def test_json_output(capsys):
    rc, out, _ = run_cli(capsys, "focal", "--input", "0.8,-1.2", "--target", "1,0", "--json", "--reduction", "sum")
    assert rc == 0
    d = json.loads(out)
    assert d["loss"] == "focal" and d["reduction"] == "sum"
    x = torch.tensor([0.8, -1.2], dtype=torch.float64)
    assert d["result"] == float(DF.sigmoid_focal_loss(x, torch.tensor([1.0, 0.0], dtype=torch.float64), reduction="sum"))
    syms = [s["symbol"] for s in d["steps"]]
    assert {"p", "p_t", "alpha_t", "(1 - p_t)^gamma"} <= set(syms)
    assert len(d["gradient"]) == 2 and d["consistent"] is True


# ----------------------------------------------------------------------------- --expect
def test_expect_seed_focal_diagnosis(capsys):
    p = sig(0.8)
    negative_branch = -(1 - 0.25) * p ** 2 * math.log(1 - p)  # the y = 0 formula, computed by hand
    assert f"{negative_branch:.4f}" == "0.4181"
    rc, out, _ = run_cli(capsys, "focal", "--input", "0.8", "--target", "1", "--expect", "0.4181")
    assert rc == 1
    assert "does not hold" in out and "0.0089" in out
    diag = [l for l in out.splitlines() if l.strip().startswith("0.4181 is")]
    assert any("opposite target" in l for l in diag), out


def test_expect_seed_row_points_at_the_wrong_element():
    # seed 001, first row of its focal table: logits, one-hot target, printed losses
    e = explain("focal", [0.1, 0.2, 0.8, 0.4, 0.4], [0, 0, 1, 0, 0], expect="0.1539,0.1810,0.4181,0.2454,0.2454")
    c = e.check_result
    assert not c.holds
    assert [m["index"] for m in c.mismatches] == [2]
    assert any("opposite target" in s for s in c.mismatches[0]["matches"])


def test_expect_holds(capsys):
    rc, out, _ = run_cli(capsys, "bce-with-logits", "--input", "0.7,0.2,0.1", "--target", "1,0,0", "--expect", "0.6486")
    assert rc == 0 and "holds" in out


def test_expect_other_diagnoses():
    # the sum instead of the mean
    e = explain("bce-with-logits", [0.7, 0.2, 0.1], [1, 0, 0], expect="1.9457")
    assert any("reduction='sum'" in s for s in e.check_result.mismatches[0]["matches"])
    # an intermediate quantity: the sigmoid, not the loss
    e = explain("bce-with-logits", [0.7], [1], expect="0.6682")
    assert any("intermediate p" in s for s in e.check_result.mismatches[0]["matches"])
    # a claim that matches nothing says so
    e = explain("mse", [1.0], [0.0], expect="7.123")
    assert "matches none" in e.check_result.lines[-1]


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs(capsys):
    rc, _, err = run_cli(capsys, "no-such-loss", "--input", "1", "--target", "1")
    assert rc == 2 and "loss_name" in err and "bce-with-logits" in err
    rc, _, err = run_cli(capsys, "bce", "--input", "0.5,abc", "--target", "1,0")
    assert rc == 2 and "input" in err and "0.5,abc" in err
    rc, _, err = run_cli(capsys, "l1", "--input", "1", "--target", "0", "--beta", "2")
    assert rc == 2 and "beta" in err and "l1" in err
    rc, _, err = run_cli(capsys, "cross-entropy", "--input", "1,2,3", "--target", "5")
    assert rc == 2 and "target" in err
    rc, _, err = run_cli(capsys, "bce-with-logits", "--input", "1,2", "--target", "1,0,1")
    assert rc == 2 and "target" in err
    with pytest.raises(ValueError, match="expect"):
        explain("mse", [1.0, 2.0], [0.0, 0.0], reduction="none", expect="1,2,3")
    with pytest.raises(ValueError, match="label"):
        explain("varifocal", [0.1], [0.5])


# ----------------------------------------------------------------------------- hostile input
def _one_line_error(capsys, *argv):
    rc, out, err = run_cli(capsys, *argv)
    assert rc == 2, (rc, out, err)
    assert out == "" and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "text, what",
    [
        (",", "empty value at position 0"),
        ("1,,2", "empty value at position 1"),
        ("1,2,", "empty value at position 2"),
        ("1,2;;3,4", "empty row 1"),
        ("nan", "'nan' at position 0"),
        ("1,-inf", "'-inf' at position 1"),
        ("1e400", "'1e400' at position 0 (beyond the float range)"),
    ],
)
def test_input_and_target_that_are_not_finite_numbers(capsys, text, what):
    # the target matches the number of values, so the error can only come from the text itself
    n = max(1, len(text.split(",")))
    err = _one_line_error(capsys, "l1", "--input", text, "--target", ",".join(["0"] * n))
    assert "input: expected comma-separated finite numbers" in err and what in err
    err = _one_line_error(capsys, "l1", "--input", ",".join(["0"] * n), "--target", text)
    assert "target: expected comma-separated finite numbers" in err and what in err


def test_values_separated_by_spaces_still_parse():
    e = explain("l1", "1 2, 3", "0,0,0", reduction="none")
    assert e.result.tolist() == [1.0, 2.0, 3.0]


def test_python_api_rejects_non_finite_tensors():
    with pytest.raises(ValueError, match=r"input: expected finite numbers, got nan at position 1"):
        explain("l1", torch.tensor([1.0, float("nan")]), [0.0, 0.0])
    with pytest.raises(ValueError, match=r"weight: expected finite numbers"):
        explain("bce-with-logits", [0.1, 0.2], [1, 0], weight=[1.0, float("inf")])


@pytest.mark.parametrize("name", ["cross-entropy", "softmax-focal"])
def test_fractional_class_index_is_an_error(capsys, name):
    err = _one_line_error(capsys, name, "--input", "1,2,3", "--target", "1.5")
    assert "target: expected class indices (whole numbers)" in err and "1.5" in err
    # whole numbers written as floats are class indices
    assert explain(name, [1.0, 2.0, 3.0], [1.0]).result.isfinite().all()


@pytest.mark.parametrize("digits", ["-3", "16", "100"])
def test_digits_out_of_range(capsys, digits):
    err = _one_line_error(capsys, "bce", "--input", "0.5", "--target", "1", "--digits", digits)
    assert "digits: expected a whole number of digits after the point from 0 to 15" in err
    err = _one_line_error(capsys, "bce", "--input", "0.5", "--target", "1", "--digits", digits, "--json")
    assert "digits" in err


def test_digits_in_range_render():
    e = explain("bce", [0.5], [1])
    assert "0.693147" in e.render(digits=6) and "0.7" in e.render(digits=1) and e.render(digits=0)


@pytest.mark.parametrize("option", ["--alpha", "--gamma"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_hyperparameters(capsys, option, value):
    err = _one_line_error(capsys, "focal", "--input", "1", "--target", "1", f"{option}={value}")
    assert f"{option[2:]}: expected a finite number" in err


def test_non_finite_claim(capsys):
    err = _one_line_error(capsys, "focal", "--input", "1", "--target", "1", "--expect", "nan")
    assert "expect: expected finite numbers" in err
