"""EndToEndLoss: the one-to-many / one-to-one combination and ultralytics' schedule.

The schedule's expected weights are the ones ultralytics 8.4.190's ``E2ELoss`` recorded in
tests/data/ultralytics_tasks (det07, det08: ``config.schedule``), whose manifest's SOURCE line reads:
"ultralytics 8.4.190, files ultralytics/utils/loss.py (v8DetectionLoss, BboxLoss, DFLoss,
E2EDetectLoss, E2ELoss, ...), utils/tal.py (...), nn/tasks.py (init_criterion), ... run unmodified on
CPU with torch 2.14.1+cu130, torch.set_default_dtype(torch.float64)". The parity of whole detector
cases through EndToEndLoss is in test_yolo26.py.
"""
from __future__ import annotations

import pytest
import torch

from detloss import LossOutput
from detloss.losses.e2e import (
    LEGACY_ONE2ONE_TOPK,
    ONE2MANY_TOPK,
    ONE2ONE_TOPK,
    EndToEndAssignment,
    EndToEndLoss,
)
from reference_cases import load_case

SCHEDULE_CASES = ["det07_v10_head_E2ELoss_rm16.npz", "det08_y26_E2ELoss_rm1.npz"]


class Toy(torch.nn.Module):
    """A stand-in base loss: two terms of the head outputs ``x`` and targets ``t``."""

    def __init__(self, scale=1.0, names=("box", "cls"), tal_topk=10, tal_topk2=None):
        super().__init__()
        self.scale, self.names, self.tal_topk, self.tal_topk2 = scale, names, tal_topk, tal_topk2

    def forward(self, x, t, *, power=2):
        terms = {self.names[0]: ((x - t) ** power).sum() * self.scale, self.names[1]: (x.sigmoid() * t).sum()}
        total = sum(terms.values())
        return LossOutput(total=total, components={k: v.detach() for k, v in terms.items()},
                          stats={"num_pos": int(t.numel())}, terms=terms)

    def assign(self, x, t):
        return ("assignment", self.tal_topk, x.shape)

    def decode(self, x):
        return x.sigmoid()


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(5, dtype=torch.float64, generator=g), torch.randn(5, dtype=torch.float64, generator=g),
            torch.rand(5, dtype=torch.float64, generator=g))


@pytest.mark.parametrize("name", SCHEDULE_CASES)
def test_schedule_matches_e2eloss(name):
    _, cfg = load_case("ultralytics_tasks", name)
    epochs = cfg["model"]["args"]["epochs"]
    loss = EndToEndLoss(Toy(), Toy(), epochs=epochs)
    for point in cfg["schedule"]:
        while loss.updates < point["updates"]:
            loss.update()
        assert (loss.o2m, loss.o2o) == (point["o2m"], point["o2o"])  # the same floats, bit for bit


def test_schedule_floor_and_epochs_given_to_update():
    loss = EndToEndLoss(Toy(), Toy())
    assert loss.o2m == 0.8 and loss.o2o == 1.0 - 0.8
    with pytest.raises(ValueError, match="epochs"):
        loss.update()
    for _ in range(7):
        loss.update(epochs=3)  # past the last epoch the weights stay at the final ones
    assert loss.updates == 7 and loss.o2m == pytest.approx(0.1, abs=1e-15) and loss.o2o == pytest.approx(0.9, abs=1e-15)
    one = EndToEndLoss(Toy(), Toy(), epochs=1)  # max(E - 1, 1): one epoch reaches the end in one step
    one.update()
    assert one.o2m == pytest.approx(0.1, abs=1e-15)


def test_resume_like_the_trainer_and_state_dict():
    a = EndToEndLoss(Toy(), Toy(), epochs=9)
    for _ in range(4):
        a.update()
    b = EndToEndLoss(Toy(), Toy(), epochs=9)
    b.updates = 3  # ultralytics: criterion.updates = start_epoch - 1; criterion.update()
    b.update()
    assert (b.updates, b.o2m, b.o2o) == (a.updates, a.o2m, a.o2o)
    c = EndToEndLoss(Toy(), Toy(), epochs=9)
    c.load_state_dict(a.state_dict())
    assert (c.updates, c.o2m, c.o2o) == (a.updates, a.o2m, a.o2o)


@pytest.mark.parametrize("weighting", ["schedule", "sum"])
def test_combination(weighting):
    xm, xo, t = _inputs()
    m, o = Toy(1.0), Toy(0.5)
    loss = EndToEndLoss(m, o, epochs=5, weighting=weighting)
    loss.update()
    out = loss(xm, xo, t, power=2)
    om, oo = m(xm, t), o(xo, t)
    wm, wo = (1.0, 1.0) if weighting == "sum" else (loss.o2m, loss.o2o)
    if weighting == "sum":
        assert loss.updates == 0  # update() changes nothing in the legacy form
    torch.testing.assert_close(out.total, om.total * wm + oo.total * wo, rtol=1e-15, atol=0)
    torch.testing.assert_close(sum(out.terms.values()), out.total, rtol=1e-14, atol=0)
    for k in ("box", "cls"):
        torch.testing.assert_close(out.terms[k], om.terms[k] * wm + oo.terms[k] * wo, rtol=1e-15, atol=0)
        want = om.components[k] + oo.components[k] if weighting == "sum" else oo.components[k]
        torch.testing.assert_close(out.components[k], want, rtol=0, atol=0)
        assert not out.components[k].requires_grad
    assert out.stats["num_pos"] == 5 and out.stats["one2many.num_pos"] == 5
    assert (out.stats["o2m_weight"], out.stats["o2o_weight"]) == (wm, wo)


def test_gradcheck():
    xm, xo, t = (v.requires_grad_(True) for v in _inputs(1))
    loss = EndToEndLoss(Toy(1.0), Toy(2.0), epochs=4)
    loss.update()
    assert torch.autograd.gradcheck(lambda a, b, c: loss(a, b, c).total, (xm, xo, t))
    assert torch.autograd.gradcheck(lambda a, b, c: torch.stack(list(loss(a, b, c).terms.values())), (xm, xo, t))


def test_gradients_reach_each_branch_with_its_weight():
    xm, xo, t = _inputs(2)
    xm.requires_grad_(True)
    xo.requires_grad_(True)
    loss = EndToEndLoss(Toy(), Toy(), epochs=4)
    gm, go = torch.autograd.grad(loss(xm, xo, t).total, (xm, xo))
    rm, = torch.autograd.grad(Toy()(xm, t).total, xm)
    ro, = torch.autograd.grad(Toy()(xo, t).total, xo)
    torch.testing.assert_close(gm, rm * 0.8, rtol=1e-15, atol=0)
    torch.testing.assert_close(go, ro * (1.0 - 0.8), rtol=1e-15, atol=0)


def test_from_loss_topk_settings_and_delegates():
    e2e = EndToEndLoss.from_loss(Toy, 1.0, epochs=3)
    assert (e2e.one2many.tal_topk, e2e.one2many.tal_topk2) == ONE2MANY_TOPK == (10, None)
    assert (e2e.one2one.tal_topk, e2e.one2one.tal_topk2) == ONE2ONE_TOPK == (7, 1)
    legacy = EndToEndLoss.from_loss(Toy, weighting="sum")
    assert (legacy.one2one.tal_topk, legacy.one2one.tal_topk2) == LEGACY_ONE2ONE_TOPK == (1, None)
    assert legacy.weighting == "sum" and (legacy.o2m, legacy.o2o) == (1.0, 1.0)
    xm, xo, t = _inputs()
    a = e2e.assign(xm, xo, t)
    assert isinstance(a, EndToEndAssignment) and a.one2many[1] == 10 and a.one2one[1] == 7
    torch.testing.assert_close(e2e.decode(xo), xo.sigmoid())
    assert "weighting='schedule'" in repr(e2e)


def test_bad_input():
    with pytest.raises(TypeError, match="one2many"):
        EndToEndLoss(lambda x: x, Toy())
    with pytest.raises(TypeError, match="one2one"):
        EndToEndLoss(Toy(), None)
    with pytest.raises(ValueError, match="weighting"):
        EndToEndLoss(Toy(), Toy(), weighting="mean")
    with pytest.raises(ValueError, match="weighting"):
        EndToEndLoss.from_loss(Toy, weighting="avg")
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="epochs"):
            EndToEndLoss(Toy(), Toy(), epochs=bad)
    with pytest.raises(ValueError, match="epochs"):
        EndToEndLoss(Toy(), Toy()).update(epochs=0)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="o2m_start"):
            EndToEndLoss(Toy(), Toy(), o2m_start=bad)
    xm, xo, t = _inputs()
    with pytest.raises(ValueError, match="same components"):
        EndToEndLoss(Toy(), Toy(names=("box", "dfl")))(xm, xo, t)

    class NotAnOutput(Toy):
        def forward(self, x, t):
            return super().forward(x, t).total

    with pytest.raises(TypeError, match="LossOutput"):
        EndToEndLoss(Toy(), NotAnOutput())(xm, xo, t)
