"""Every registered detector loss has the same shape: the same stats keys with the same Python
types, terms that sum to the total, an Assignment whose predictions are the ones decode()
returns, and decode() is what the demo evaluates."""
from __future__ import annotations

import pytest
import torch

from detloss.assign.base import Assignment
from detloss.losses.base import STAT_KEYS, Decoded, DetectionLoss
from detloss.losses.detr import SetCriterion
from detloss.losses.registry import LOSSES

SIZE = (64, 64)
ROWS = torch.tensor(
    [[0, 0, 0.30, 0.40, 0.35, 0.30], [0, 2, 0.70, 0.60, 0.40, 0.50], [1, 1, 0.45, 0.45, 0.25, 0.30]],
    dtype=torch.float64,
)


def _loss(name, **kw):
    cls = LOSSES[name]
    if cls.image_size_argument is not None:
        kw[cls.image_size_argument] = SIZE
    return cls(3 + cls.background_classes, **kw)


def _outputs(loss, seed=0):
    """An untrained head's outputs for two images, made random."""
    g = torch.Generator().manual_seed(seed)

    def noisy(x):  # the head's outputs (batch-first tensors), not anchors [A, 4] given with them
        if isinstance(x, torch.Tensor) and x.shape[0] == 2:
            return (x + torch.randn(x.shape, generator=g, dtype=x.dtype)).requires_grad_(True)
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            return [noisy(t) for t in x]
        return x

    return tuple(noisy(x) for x in loss.prior_outputs(SIZE, batch_size=2))


def test_the_registry_is_the_detector_losses():
    assert set(LOSSES) >= {"yolov3", "yolov5", "fcos", "yolov8"}
    for name, cls in LOSSES.items():
        assert issubclass(cls, DetectionLoss) and cls.name == name


#: The dense-head losses; the set-prediction ones (DETR family) report their originals' per-layer
#: keys and have no grid prior: their shape is tested in tests/losses/test_detr_edge.py.
DENSE = sorted(n for n, c in LOSSES.items() if not issubclass(c, SetCriterion))


@pytest.mark.parametrize("name", DENSE)
@pytest.mark.parametrize("rows", [ROWS, ROWS[:0]], ids=["targets", "no_targets"])
def test_same_stats_terms_and_assignment(name, rows):
    loss = _loss(name)
    outputs = _outputs(loss)
    call = loss.call_kwargs(SIZE)
    targets = loss.targets_from_rows(rows, 2, SIZE)
    out = loss(*outputs, targets, **call)
    for key, typ in STAT_KEYS.items():
        assert type(out.stats[key]) is typ, (name, key)
    assert out.stats["num_targets"] == rows.shape[0]
    assert 0.0 <= out.stats["iou_mean"] <= 1.0 and out.stats["normalizer"] >= 0
    assert list(out.components) == list(out.terms) == list(loss.term_methods) == list(loss.gains)
    assert all(not v.requires_grad for v in out.components.values())
    torch.testing.assert_close(sum(out.terms.values()), out.total, rtol=1e-9, atol=1e-12)
    out.total.backward()
    asg = loss.assign(*outputs, targets, **call)
    assert isinstance(asg, Assignment) and asg.num_pos == out.stats["num_pos"]
    assert (asg.num_pos > 0) == (rows.shape[0] > 0)
    levels = loss.prediction_levels(*outputs, **call)
    decoded = loss.decode(*outputs, **call)
    assert isinstance(decoded, Decoded)
    assert decoded.boxes.shape == (2, asg.num_preds, 4) and decoded.scores.shape == (2, asg.num_preds, 3 + loss.background_classes)
    assert asg.num_preds == sum(lv.num_preds for lv in levels)
    assert bool(((decoded.scores >= 0) & (decoded.scores <= 1)).all())
    assert len(loss.assignment_notes(asg)) == asg.num_pos


@pytest.mark.parametrize("name", ["yolov3", "yolov5", "fcos", "yolov8"])
def test_decode_is_what_the_demo_evaluates(name):
    from detloss.tools.demo import evaluate
    from detloss.tools.demo.models import LOSSES as DEMO_LOSSES, Detector

    assert name in DEMO_LOSSES
    torch.manual_seed(0)
    model = Detector(name, 3, 64).eval()
    loss = model.build_loss()
    assert type(loss) is LOSSES[name]
    with torch.no_grad():
        outputs = model(torch.rand(2, 3, 64, 64))
        boxes, scores = evaluate.decode(name, outputs, model.config)
        args = outputs if isinstance(outputs, tuple) else (outputs,)
        want = loss.decode(*args)
    assert torch.equal(boxes, want.boxes.float()) and torch.equal(scores, want.scores.float())
