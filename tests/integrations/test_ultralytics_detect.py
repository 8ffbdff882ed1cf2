"""detloss.integrations.ultralytics.DetectionLoss / E2EDetectLoss against ultralytics' criteria.

Reference data: tests/data/ultralytics_tasks (det01..det08), whose manifest's SOURCE line reads:
"ultralytics 8.4.190, files ultralytics/utils/loss.py (v8DetectionLoss, ..., E2EDetectLoss, E2ELoss, ...),
utils/tal.py (TaskAlignedAssigner, ...), nn/tasks.py (init_criterion), ... run unmodified on CPU with
torch 2.14.1+cu130, torch.set_default_dtype(torch.float64) ...".

Each case is called exactly as ultralytics' criterion was (``loss, items = crit(preds, batch)``
under a float64 default dtype, the manifest's rule), with the minimal model of config.model as a
strict stand-in that fails on any read ultralytics' criteria do not make; the loss vector, the
items (keys and values) and the gradients of ``loss.sum()`` w.r.t. every preds tensor are compared
at every recorded schedule point, ``update()`` stepping the schedule in between.
"""
from __future__ import annotations

import math

import pytest
import torch

from detloss.integrations.ultralytics import DetectionLoss, E2EDetectLoss, criterion_for
from reference_cases import case_names, check_reads, load_case, schedule_points, task_batch, task_preds
from ultralytics_models import minimal_model, reads_of

FOLDER = "ultralytics_tasks"
DET = case_names(FOLDER, "det*.npz")
API = {"DetectionLoss": DetectionLoss, "E2EDetectLoss": E2EDetectLoss}
HEAD_READS = {"stride", "nc", "reg_max", "one2one_cv2"}


@pytest.fixture
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def close(actual, expected, tol):
    """Within ``rtol`` of the expected array's largest magnitude plus ``atol`` (config.tolerance)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.numel():
        scale = float(expected.abs().max())
        assert float((actual.detach() - expected).abs().max()) <= tol["rtol"] * scale + tol["atol"]


@pytest.mark.parametrize("name", DET)
def test_matches_ultralytics(name, float64_default):
    arrays, cfg = load_case(FOLDER, name)
    model = minimal_model(cfg["model"])
    crit = API[cfg["api"]](model)
    assert crit.form == {"v8DetectionLoss": "single", "E2ELoss": "e2e", "E2EDetectLoss": "e2e_sum"}[cfg["criterion"][0]]
    tol = cfg["tolerance"]
    batch = task_batch(arrays)
    for k, point in zip(schedule_points(cfg), cfg["schedule"]):
        while crit.updates < k:
            crit.update()
        assert (crit.o2m, crit.o2o) == ((point["o2m"], point["o2o"]) if point["o2m"] is not None else
                                        ((1.0, 1.0) if crit.form == "e2e_sum" else (None, None)))
        preds, leaves = task_preds(arrays, cfg)
        loss, items = crit(preds, batch)
        assert list(items) == cfg["item_names"]
        close(loss, arrays[f"loss.u{k}"], tol)
        close(torch.stack(list(items.values())), arrays[f"items.u{k}"], tol)
        assert all(v.ndim == 0 and not v.requires_grad for v in items.values())
        if k in cfg["grad_points"]:
            grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
            for path, g in zip(leaves, grads):
                close(g, arrays[f"grad.u{k}.{path[len('pred.'):]}"], tol)
    for _ in range(3):  # stepping past the recorded points reads epochs only where the case has them
        crit.update()
    check_reads(model, cfg)  # exactly the reads ultralytics' criterion made (config.reads)
    assert set(reads_of(model.model[-1])) <= HEAD_READS


@pytest.mark.parametrize("name", ["det01_v8_rm16.npz", "det08_y26_E2ELoss_rm1.npz"])
def test_eval_mode_tuple_and_criterion_for(name, float64_default):
    arrays, cfg = load_case(FOLDER, name)
    crit = criterion_for(minimal_model(cfg["model"]))
    assert type(crit) is DetectionLoss
    preds, _ = task_preds(arrays, cfg)
    loss, items = crit((torch.zeros(1), preds), task_batch(arrays))
    close(loss, arrays["loss.u0"], cfg["tolerance"])


def test_float32_default_and_inputs():
    """Under torch's float32 default with float32 head outputs (a real training run), the loss
    vector is float32 as ultralytics allocates it, and equals the float64 result to float32 precision."""
    arrays, cfg = load_case(FOLDER, "det04_y26_rm1_l1_nonsquare.npz")
    arrays = {k: v.float() if v.is_floating_point() else v for k, v in arrays.items()}
    crit = DetectionLoss(minimal_model(cfg["model"]))
    preds, leaves = task_preds(arrays, cfg)
    loss, items = crit(preds, task_batch(arrays))
    assert loss.dtype == torch.float32 and all(v.dtype == torch.float32 for v in items.values())
    torch.testing.assert_close(loss.detach(), arrays["loss.u0"], rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(loss.sum(), list(leaves.values()))
    assert all(g.dtype == torch.float32 for g in grads)


def test_nan_head_outputs_give_a_nan_loss():
    """A diverged model's NaN is not an error here: ultralytics' trainer recovers from a NaN loss."""
    arrays, cfg = load_case(FOLDER, "det01_v8_rm16.npz")
    preds, _ = task_preds(arrays, cfg)
    preds["scores"] = preds["scores"].detach().clone()
    preds["scores"][0, 0, 5] = float("nan")
    loss, _ = DetectionLoss(minimal_model(cfg["model"]))(preds, task_batch(arrays))
    assert math.isnan(float(loss.detach().sum()))


def _bad(preds, batch, cfg, err, match, api=DetectionLoss):
    with pytest.raises(err, match=match):
        api(minimal_model(cfg["model"]))(preds, batch)


def test_bad_input():
    arrays, cfg = load_case(FOLDER, "det01_v8_rm16.npz")  # nc 4, reg_max 16, 252 anchors
    batch = task_batch(arrays)

    def preds(**kw):
        p, _ = task_preds(arrays, cfg)
        p.update(kw)
        return p

    boxes, scores = arrays["pred.boxes"], arrays["pred.scores"]
    _bad(preds(boxes=boxes[:, :4]), batch, cfg, ValueError, r"preds\['boxes'\]: expected shape \[B, 64 \(4 \* reg_max 16\)")
    _bad(preds(scores=scores[:, :3]), batch, cfg, ValueError, r"preds\['scores'\]: expected shape \[B, 4 \(nc 4\)")
    _bad(preds(scores=scores[:, :, :-1]), batch, cfg, ValueError, r"preds\['scores'\]: expected \[2, 4, 252\]")
    _bad(preds(scores=scores[:1]), batch, cfg, ValueError, r"preds\['scores'\]: expected \[2, 4, 252\]")
    _bad(preds(boxes=boxes.long()), batch, cfg, TypeError, r"preds\['boxes'\]: expected a floating-point")
    _bad(preds(feats=preds()["feats"][:2]), batch, cfg, ValueError, "3 levels")
    p = preds()
    del p["scores"]
    _bad(p, batch, cfg, ValueError, "'scores' entry")
    _bad(preds(), dict(batch, cls=batch["cls"] + 10), cfg, ValueError, "class < num_classes = 4")
    _bad(preds(), dict(batch, batch_idx=batch["batch_idx"] + 5), cfg, ValueError, "image index")
    _bad(preds(), {k: v for k, v in batch.items() if k != "bboxes"}, cfg, ValueError, "'bboxes'")
    e2e_arrays, e2e_cfg = load_case(FOLDER, "det08_y26_E2ELoss_rm1.npz")
    e2e_preds, _ = task_preds(e2e_arrays, e2e_cfg)
    _bad(e2e_preds, task_batch(e2e_arrays), cfg, ValueError, "end-to-end head's")
    _bad(preds(), batch, e2e_cfg, ValueError, "'one2many' and 'one2one'")
    _bad(preds(), batch, cfg, ValueError, "'one2many' and 'one2one'", api=E2EDetectLoss)
    # reg_max 1 head (4 box channels) given DFL outputs
    rm1 = dict(cfg["model"], head=dict(cfg["model"]["head"], reg_max=1))
    with pytest.raises(ValueError, match=r"4 \(4 \* reg_max 1\)"):
        DetectionLoss(minimal_model(rm1))(preds(), batch)
