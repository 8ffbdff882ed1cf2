"""The four detector losses under hostile but realistic input, driven through their hooks
(``prior_outputs``, ``targets_from_rows``, ``call_kwargs``) so that each case runs on every loss:
a batch of zero images, non-finite predictions, and ``torch.autocast``. The per-loss cases
(FCOS's YOLO rows, YOLOv8's level sizes and padding rule, TAL's arguments) are in the loss's own
test module."""
from __future__ import annotations

import math

import pytest
import torch

from detloss.losses.base import STAT_KEYS
from detloss.losses.registry import LOSSES

SIZE = (64, 64)
ROWS = torch.tensor([[0, 0, 0.30, 0.40, 0.35, 0.30], [0, 2, 0.70, 0.60, 0.40, 0.50], [1, 1, 0.45, 0.45, 0.25, 0.30]])
FLAVORS = [("yolov3", {}), ("yolov3", {"flavor": "pytorch-yolov3"}), ("yolov5", {}), ("fcos", {}),
           ("fcos", {"convention": "mmdet"}), ("yolov8", {})]
IDS = ["darknet", "pytorch-yolov3", "yolov5", "fcos", "fcos-mmdet", "yolov8"]


def _loss(name, **kw):
    cls = LOSSES[name]
    if cls.image_size_argument is not None:
        kw[cls.image_size_argument] = SIZE
    return cls(3, **kw)


def _tensors(outputs):
    """The head tensors among ``outputs`` (a tensor or a list of per-level tensors each)."""
    out = []
    for x in outputs:
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            out.extend(x)
    return out


def _outputs(loss, batch, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)

    def noisy(x):
        if isinstance(x, torch.Tensor):
            return (x + torch.randn(x.shape, generator=g, dtype=x.dtype)).to(dtype).requires_grad_(True)
        if isinstance(x, list) and x and isinstance(x[0], torch.Tensor):
            return [noisy(t) for t in x]
        return x

    return tuple(noisy(x) for x in loss.prior_outputs(SIZE, batch_size=batch))


@pytest.mark.parametrize("name, kw", FLAVORS, ids=IDS)
def test_a_batch_of_zero_images_is_a_zero_loss_with_a_graph(name, kw):
    loss = _loss(name, **kw)
    outputs = _outputs(loss, 0)
    targets = loss.targets_from_rows(ROWS[:0], 0, SIZE)
    call = loss.call_kwargs(SIZE)
    out = loss(*outputs, targets, **call)
    assert out.total.requires_grad and float(out.total.detach()) == 0.0
    heads = _tensors(outputs)
    grads = torch.autograd.grad(out.total, heads, allow_unused=True)
    assert all(g is None or (g.shape == h.shape) for g, h in zip(grads, heads))
    assert out.stats["num_pos"] == out.stats["num_targets"] == 0 and out.stats["iou_mean"] == 0.0
    for key, typ in STAT_KEYS.items():
        assert type(out.stats[key]) is typ, key
        assert math.isfinite(out.stats[key]), key
    assert all(float(v) == 0.0 for v in out.components.values())
    torch.testing.assert_close(sum(out.terms.values()), out.total)
    assert loss.assign(*outputs, targets, **call).num_pos == 0
    decoded = loss.decode(*outputs, **call)
    assert decoded.boxes.shape[0] == decoded.scores.shape[0] == 0
    assert decoded.boxes.shape[2] == 4 and decoded.scores.shape[2] == 3


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name, kw", FLAVORS, ids=IDS)
def test_non_finite_predictions_are_refused_naming_the_argument(name, kw, bad):
    """Not a NaN loss, nor an error about an internal tensor (PyTorch-YOLOv3's probabilities):
    the argument the caller passed, as its name in ``forward``."""
    loss = _loss(name, **kw)
    outputs = _outputs(loss, 2)
    targets = loss.targets_from_rows(ROWS, 2, SIZE)
    call = loss.call_kwargs(SIZE)
    names = {"yolov3": r"inputs\[1\]", "yolov5": r"preds\[1\]", "yolov8": r"feats\[1\]", "fcos": "bbox_regression"}
    arg = outputs[1] if name == "fcos" else outputs[0][1]
    with torch.no_grad():
        arg.view(-1)[arg.numel() // 2] = bad  # an objectness, box or class entry alike
    with pytest.raises(ValueError, match=names[name] + r": expected finite values, got (-?(nan|inf)|NaN or inf) at"):
        loss(*outputs, targets, **call)


@pytest.mark.parametrize("name, kw", FLAVORS, ids=IDS)
def test_autocast_bfloat16_computes_as_float32(name, kw):
    """A loss called inside a CPU autocast region gives the float32 result, gradients included."""
    loss = _loss(name, **kw)
    plain = _outputs(loss, 2)
    auto = _outputs(loss, 2)
    targets = loss.targets_from_rows(ROWS, 2, SIZE)
    call = loss.call_kwargs(SIZE)
    want = loss(*plain, targets, **call)
    want.total.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(*auto, targets, **call)
    got.total.backward()
    assert got.total.dtype == torch.float32 and got.stats["num_pos"] > 0
    for k in want.components:
        assert torch.equal(got.components[k], want.components[k]), k
    for a, b in zip(_tensors(auto), _tensors(plain)):
        assert torch.equal(a.grad, b.grad)


def test_the_finiteness_check_is_exact_when_sums_overflow():
    """check_finite sums each tensor first; a sum that overflows on finite values must not be
    taken for a NaN or inf."""
    from detloss._checks import check_finite

    big = torch.full((64,), 3e38)
    check_finite(["big", "half"], [big, torch.full((8,), 6e4, dtype=torch.float16)])
    check_finite([], [])
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = big.clone()
        x[5] = bad
        with pytest.raises(ValueError, match=r"x: expected finite values, got -?(nan|inf) at index \(5,\)"):
            check_finite(["ok", "x"], [big, x])
    # +inf and -inf cancel to NaN in a sum, and still count
    x = torch.ones(4)
    x[1], x[2] = float("inf"), -float("inf")
    with pytest.raises(ValueError, match=r"x: expected finite values, got inf at index \(1,\)"):
        check_finite(["x"], [x])
