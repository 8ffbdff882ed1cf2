"""detloss.losses._rows.gather_rows: the positives' rows of ``[B, A, ...]`` head outputs of any
layout, with a gradient laid out like the output (no transposed copy back into the head's
``(B, C, A)`` tensor); and the drop-in ultralytics criteria's gradients in the heads' own layout."""
from __future__ import annotations

import pytest
import torch

from detloss.losses import _rows
from detloss.losses._rows import gather_rows

from reference_cases import load_case, task_batch, task_preds
from ultralytics_models import minimal_model


def _views(dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    return {
        "contiguous": torch.randn(3, 7, 5, generator=gen, dtype=dtype),
        "transposed": torch.randn(3, 5, 7, generator=gen, dtype=dtype).transpose(1, 2),
        "keypoints": torch.randn(3, 6, 7, generator=gen, dtype=dtype).permute(0, 2, 1).unflatten(-1, (3, 2)),
        "one image": torch.randn(1, 5, 7, generator=gen, dtype=dtype).transpose(1, 2),
    }


@pytest.mark.parametrize("kind", list(_views()))
def test_values_gradcheck_and_layout(kind):
    base = _views()[kind]
    image = torch.tensor([0, base.shape[0] - 1, 0, base.shape[0] - 1])
    anchor = torch.tensor([3, 6, 3, 0])  # (0, 3) twice: its gradients add up
    assert torch.equal(gather_rows(base, image, anchor), base[image, anchor])
    leaf = base.detach().clone().requires_grad_(True)
    w = torch.randn(base[image, anchor].shape, dtype=base.dtype)
    assert torch.autograd.gradcheck(lambda t: (gather_rows(t, image, anchor) * w).sum(), (leaf,))
    (g,) = torch.autograd.grad((gather_rows(leaf, image, anchor) * w).sum(), leaf)
    assert [g.stride(d) for d in range(g.ndim) if g.shape[d] > 1] == [base.stride(d) for d in range(g.ndim) if g.shape[d] > 1]


def test_double_backward():
    t = _views()["transposed"].detach().clone().requires_grad_(True)
    image, anchor = torch.tensor([0, 2]), torch.tensor([1, 4])
    assert torch.autograd.gradgradcheck(lambda x: (gather_rows(x, image, anchor) ** 3).sum(), (t,))


def test_without_grad_and_under_torch_func():
    t = _views()["transposed"]
    image, anchor = torch.tensor([0, 2]), torch.tensor([1, 4])
    assert not gather_rows(t, image, anchor).requires_grad
    g = torch.func.grad(lambda x: gather_rows(x, image, anchor).square().sum())(t)
    expected = torch.zeros_like(t)
    expected[image, anchor] = 2 * t[image, anchor]
    assert torch.equal(g, expected)


@pytest.mark.parametrize("name", ["det01_v8_rm16.npz", "pose01_v8_17kpt.npz"])
def test_ultralytics_criteria_gradients_in_the_heads_layout(name, monkeypatch):
    """The drop-in criteria read ultralytics' ``(B, C, A)`` outputs as ``[B, A, C]`` views; the
    gradient of each output comes back in its own (contiguous) layout, the box channels' and the
    keypoints' straight from the buffer :func:`zero_gradient` gave (no copy after it)."""
    from detloss.integrations.ultralytics import DetectionLoss, PoseLoss

    folder = "ultralytics_tasks"
    arrays, cfg = load_case(folder, name)
    buffers = []
    real = _rows.zero_gradient

    def spy(*args):
        buffers.append(real(*args))
        return buffers[-1]

    monkeypatch.setattr(_rows, "zero_gradient", spy)
    crit = (PoseLoss if name.startswith("pose") else DetectionLoss)(minimal_model(cfg["model"]))
    preds, leaves = task_preds(arrays, cfg)
    loss, _ = crit(preds, task_batch(arrays))
    grads = dict(zip(leaves, torch.autograd.grad(loss.sum(), list(leaves.values()))))
    assert all(g.is_contiguous() for g in grads.values()), {k: (tuple(g.shape), g.stride()) for k, g in grads.items()}
    ptrs = {b.data_ptr() for b in buffers}
    for key in ("pred.boxes",) + (("pred.kpts",) if name.startswith("pose") else ()):
        assert grads[key].data_ptr() in ptrs, key
