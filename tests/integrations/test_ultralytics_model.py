"""detloss.integrations.ultralytics: model reading, preds / batch parsing, the form selection and
the swap-in callback, with stand-in models that allow only the reads ultralytics' criteria make.

The stand-ins follow config.model of the cases in tests/data/ultralytics_tasks, whose manifest's
SOURCE line reads: "ultralytics 8.4.190, files ultralytics/utils/loss.py (...), nn/tasks.py
(init_criterion), nn/modules/head.py and nn/modules/block.py (heads, RealNVP), run unmodified on CPU
with torch 2.14.1+cu130, torch.set_default_dtype(torch.float64) (float32 for the Segment26 cases)".
"""
from __future__ import annotations

import pytest
import torch

from detloss import LossOutput
from detloss.integrations import ultralytics as du
from detloss.losses.e2e import EndToEndLoss
from reference_cases import case_names, load_case
from ultralytics_models import HEAD_BASES, ForbiddenRead, minimal_model, reads_of

DET = case_names("ultralytics_tasks", "det*.npz")
ALLOWED_HEAD = {"stride", "nc", "reg_max", "one2one_cv2"}


class ToyBranch(torch.nn.Module):
    """A stand-in branch: two terms of preds["boxes"], the tal settings kept for inspection."""

    def __init__(self, tal_topk, tal_topk2):
        super().__init__()
        self.tal_topk, self.tal_topk2 = tal_topk, tal_topk2

    def forward(self, preds, batch):
        x = preds["boxes"]
        bs = x.shape[0]
        w = {"box": (x ** 2).mean() * 2.0, "cls": x.sigmoid().mean() + batch["cls"].sum() * 0}
        return LossOutput(total=sum(w.values()) * bs, components={k: v.detach() for k, v in w.items()},
                          stats={}, terms={k: v * bs for k, v in w.items()})


class ToyLoss(du.UltralyticsCriterion):
    def make_branch(self, model, info, tal_topk, tal_topk2):
        self.gain = du.hyp(model.args, "box")
        return ToyBranch(tal_topk, tal_topk2)


class LegacyToy(ToyLoss):
    fixed_form = "e2e_sum"


def _model(name, **kw):
    _, cfg = load_case("ultralytics_tasks", name)
    return minimal_model(cfg["model"], **kw), cfg


def _preds(e2e, bs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    one = lambda: {"boxes": torch.randn(bs, 4, 10, generator=g, requires_grad=True), "scores": torch.randn(bs, 3, 10, generator=g),
                   "feats": [torch.zeros(bs, 1, 2, 4)]}
    return {"one2many": one(), "one2one": one()} if e2e else one()


BATCH = {"batch_idx": torch.tensor([0.0, 1.0]), "cls": torch.tensor([[1.0], [0.0]]),
         "bboxes": torch.tensor([[0.5, 0.5, 0.2, 0.3], [0.25, 0.6, 0.1, 0.1]])}


@pytest.mark.parametrize("name", DET)
def test_read_model_reads_only_what_ultralytics_reads(name):
    model, cfg = _model(name)
    info = du.read_model(model)
    head = model.model[-1]
    hcfg = cfg["model"]["head"]
    assert info.strides == tuple(float(s) for s in hcfg["stride"])
    assert (info.num_classes, info.reg_max) == (hcfg["nc"], hcfg["reg_max"])
    assert info.head is head and info.device == torch.device("cpu")
    assert info.head_is(hcfg["type"]) and info.head_is("Detect") and not info.head_is("Pose")
    assert info.end_to_end == ("one2one_cv2" in hcfg)
    cw = cfg["model"].get("class_weights")
    if cw is None:
        assert info.class_weights is None
    else:
        torch.testing.assert_close(info.class_weights, torch.tensor(cw["values"], dtype=torch.float32), rtol=0, atol=0)
    assert set(reads_of(model)) <= set(cfg["reads"]["model"])
    assert set(reads_of(head)) <= ALLOWED_HEAD
    assert reads_of(model.args) == []


def test_strict_stand_in_raises_on_other_reads():
    model, _ = _model(DET[0])
    with pytest.raises(ForbiddenRead):
        getattr(model.args, "epochs", None)  # not swallowed by a getattr default
    with pytest.raises(ForbiddenRead):
        model.model[-1].anchors
    with pytest.raises(AttributeError):
        model.class_weights  # unset: as on a real model


@pytest.mark.parametrize(
    "name, form",
    [("det01_v8_rm16.npz", "single"), ("det04_y26_rm1_l1_nonsquare.npz", "single"),
     ("det06_v10_E2EDetectLoss.npz", "e2e"), ("det07_v10_head_E2ELoss_rm16.npz", "e2e"), ("det08_y26_E2ELoss_rm1.npz", "e2e")],
)
def test_form_follows_init_criterion(name, form):
    model, _ = _model(name)
    crit = ToyLoss(model)
    assert crit.form == form and crit.gain == 7.5
    if form == "single":
        assert isinstance(crit.loss, ToyBranch) and (crit.loss.tal_topk, crit.loss.tal_topk2) == (10, None)
        assert crit.o2m is None and crit.updates == 0
    else:
        assert isinstance(crit.loss, EndToEndLoss) and crit.loss.weighting == "schedule"
        assert [(b.tal_topk, b.tal_topk2) for b in (crit.loss.one2many, crit.loss.one2one)] == [(10, None), (7, 1)]
    legacy = LegacyToy(model)
    assert legacy.form == "e2e_sum" and legacy.loss.weighting == "sum"
    assert [(b.tal_topk, b.tal_topk2) for b in (legacy.loss.one2many, legacy.loss.one2one)] == [(10, None), (1, None)]


def test_legacy_form_does_not_read_one2one_cv2():
    model, _ = _model("det06_v10_E2EDetectLoss.npz")
    LegacyToy(model)
    assert "one2one_cv2" not in reads_of(model.model[-1])


@pytest.mark.parametrize("e2e", [False, True])
def test_call_returns_vector_and_items(e2e):
    model, _ = _model("det08_y26_E2ELoss_rm1.npz" if e2e else "det01_v8_rm16.npz")
    crit = ToyLoss(model)
    preds = _preds(e2e)
    vec, items = crit(preds, BATCH)
    vec2, items2 = crit((torch.zeros(1), preds), BATCH)  # eval-mode (inference, dict) tuple
    torch.testing.assert_close(vec, vec2, rtol=0, atol=0)
    assert list(items) == ["box_loss", "cls_loss"] and vec.shape == (2,) and vec.dtype == torch.get_default_dtype()
    assert vec.requires_grad and not any(v.requires_grad for v in items.values())
    branch = preds["one2one"] if e2e else preds
    ref = ToyBranch(0, 0)(branch, BATCH)
    torch.testing.assert_close(torch.stack(list(items.values())), torch.stack(list(ref.components.values())), rtol=0, atol=0)
    if e2e:
        m = ToyBranch(0, 0)(preds["one2many"], BATCH)
        want = torch.stack(list(m.terms.values())) * 0.8 + torch.stack(list(ref.terms.values())) * (1.0 - 0.8)
        torch.testing.assert_close(vec, want, rtol=1e-15, atol=0)
    assert isinstance(crit.last_output, LossOutput)


def test_update_reads_epochs_only_there():
    model, cfg = _model("det08_y26_E2ELoss_rm1.npz")
    crit = ToyLoss(model)
    crit(_preds(True), BATCH)
    assert "epochs" not in reads_of(model.args)
    crit.update()
    assert reads_of(model.args)[-1] == "epochs"
    assert (crit.updates, crit.o2m, crit.o2o) == (1, cfg["schedule"][1]["o2m"], cfg["schedule"][1]["o2o"])
    without, _ = _model("det06_v10_E2EDetectLoss.npz")  # no epochs in its args
    e2e = ToyLoss(without)
    with pytest.raises(ForbiddenRead):
        e2e.update()
    LegacyToy(without).update()  # the legacy sum has no schedule: reads nothing
    ToyLoss(_model("det01_v8_rm16.npz")[0]).update()


def test_parsing_errors():
    single = ToyLoss(_model("det01_v8_rm16.npz")[0])
    e2e = ToyLoss(_model("det08_y26_E2ELoss_rm1.npz")[0])
    with pytest.raises(ValueError, match="end-to-end head's"):
        single(_preds(True), BATCH)
    with pytest.raises(ValueError, match="'one2many' and 'one2one'"):
        e2e(_preds(False), BATCH)
    with pytest.raises(TypeError, match="preds"):
        single([torch.zeros(1)], BATCH)
    with pytest.raises(ValueError, match="'bboxes'"):
        du.batch_rows({"batch_idx": BATCH["batch_idx"], "cls": BATCH["cls"]}, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"batch\['bboxes'\]: expected shape \(2, 4\)"):
        du.batch_rows(dict(BATCH, bboxes=torch.zeros(2, 5)), torch.device("cpu"))
    with pytest.raises(ValueError, match=r"batch\['cls'\]"):
        du.batch_rows(dict(BATCH, cls=torch.zeros(3, 1)), torch.device("cpu"))
    with pytest.raises(TypeError, match="batch"):
        du.batch_rows([1, 2], torch.device("cpu"))
    with pytest.raises(ValueError, match="3 levels"):
        du.levels_of([torch.zeros(1, 1, 2, 2)], (8.0, 16.0, 32.0))
    with pytest.raises(TypeError, match="feats"):
        du.levels_of(torch.zeros(1, 1, 2, 2), (8.0,))
    rows = du.batch_rows(BATCH, torch.device("cpu"))
    torch.testing.assert_close(rows[:, 0], BATCH["batch_idx"])
    torch.testing.assert_close(rows[:, 1], BATCH["cls"][:, 0])
    torch.testing.assert_close(rows[:, 2:], BATCH["bboxes"])
    assert du.levels_of([torch.zeros(1, 1, 3, 5)], (8,)) == [(3, 5, 8.0)]


class Plain:
    """A writable stand-in (for the trainer side, which is not the criterion's reading)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _plain_model(cls_name, cfg, **kw):
    h = cfg["model"]["head"]
    head = HEAD_BASES[h["type"]]("head", {"stride": torch.tensor(h["stride"]), "nc": h["nc"], "reg_max": h["reg_max"],
                                          **({"one2one_cv2": object()} if "one2one_cv2" in h else {})}, absent=["one2one_cv2"])
    param = torch.zeros(1)
    return type(cls_name, (Plain,), {"parameters": lambda self: iter([param])})(
        args=Plain(**cfg["model"]["args"]), model=[head], **kw)


def test_model_errors():
    model, cfg = _model("det01_v8_rm16.npz")
    bad = minimal_model(dict(cfg["model"], class_weights={"values": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="class_weights: expected 4"):
        du.read_model(bad)
    no_box = _plain_model("DetectionModel", cfg)
    del no_box.args.box
    with pytest.raises(ValueError, match="model.args.box"):
        ToyLoss(no_box)
    with pytest.raises(TypeError, match="model.args.box"):
        du.hyp(Plain(box="7.5"), "box")


def test_criterion_for_and_install():
    _, cfg = _model("det07_v10_head_E2ELoss_rm16.npz")
    saved = dict(du.CRITERIA)
    try:
        du.CRITERIA.clear()
        du.register_criterion("DetectionModel")(ToyLoss)
        du.register_criterion("PoseModel")(LegacyToy)
        strict, _ = _model("det07_v10_head_E2ELoss_rm16.npz")
        assert type(du.criterion_for(strict)) is ToyLoss
        pose = minimal_model(dict(cfg["model"], head=dict(cfg["model"]["head"], type="Pose")), task="pose")
        assert type(du.criterion_for(pose)) is LegacyToy  # the most derived task class wins
        with pytest.raises(TypeError, match="ultralytics task model"):
            du.criterion_for(torch.nn.Linear(1, 1))
        # real classes: the one that defines init_criterion (or loss) decides, as in ultralytics
        # (RTDETR, World and YOLOE models subclass DetectionModel with criteria of their own)
        base = type("BaseModel", (Plain,), {"init_criterion": lambda self: None, "loss": lambda self: None})
        det = type("DetectionModel", (base,), {"init_criterion": lambda self: None})
        world = type("WorldModel", (det,), {"loss": lambda self: None})
        obb = type("OBBModel", (det,), {"init_criterion": lambda self: None})
        tiny = type("MyDetectionModel", (det,), {})  # a user subclass keeps DetectionModel's criterion
        for cls, want in ((det, ToyLoss), (tiny, ToyLoss), (world, None), (obb, None)):
            m = _plain_model("x", cfg)
            m.__class__ = type(cls.__name__, (cls,), {"parameters": type(m).parameters})
            if want is None:
                with pytest.raises(TypeError, match=cls.__name__):
                    du.criterion_for(m)
            else:
                assert type(du.criterion_for(m)) is want

        # on resume ultralytics' trainer leaves an E2ELoss with updates = start_epoch - 1, then update()
        resumed = Plain(updates=3, o2m=cfg["schedule"][2]["o2m"], o2o=cfg["schedule"][2]["o2o"])
        model = _plain_model("DetectionModel", cfg, criterion=resumed)
        trainer = Plain(model=Plain(module=model))  # DDP-wrapped
        du.install_criterion(trainer)
        crit = model.criterion
        assert isinstance(crit, ToyLoss) and (crit.updates, crit.o2m, crit.o2o) == (3, resumed.o2m, resumed.o2o)
        fresh = _plain_model("DetectionModel", cfg, criterion=None)
        du.install_criterion(Plain(model=Plain(_orig_mod=fresh)))  # torch.compile-wrapped, no criterion yet
        assert isinstance(fresh.criterion, ToyLoss) and fresh.criterion.updates == 0 and fresh.criterion.o2m == 0.8
    finally:
        du.CRITERIA.clear()
        du.CRITERIA.update(saved)


def test_use_detloss_adds_the_callback():
    seen = []
    yolo = type("YOLO", (), {"add_callback": lambda self, event, fn: seen.append((event, fn))})()
    assert du.use_detloss(yolo) is yolo and seen == [("on_train_start", du.install_criterion)]


def test_head_stand_ins_mirror_ultralytics_bases():
    assert du.head_class_names(HEAD_BASES["OBB26"]("h", {}))[:3] == ("OBB26", "OBB", "Detect")
    assert du.head_class_names(HEAD_BASES["v10Detect"]("h", {}))[:2] == ("v10Detect", "Detect")
