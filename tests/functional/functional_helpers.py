"""Helpers for the functional tests (reference loading, value-and-gradient, comparison)."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest
import torch

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"


def load_npz(folder: str, name: str):
    path = DATA / folder / name
    if not path.exists():
        pytest.fail(f"reference data missing: {path}")
    return np.load(path, allow_pickle=False)


def t64(a) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float64)


def value_and_grads(fn, *inputs):
    """fn(*inputs) and the gradients of its sum w.r.t. each input (float64 leaf copies)."""
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True)
    return out.detach(), [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]


def assert_close(actual, expected, rtol=1e-6, atol=1e-12, msg=""):
    actual = torch.as_tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(np.asarray(expected), dtype=torch.float64)
    torch.testing.assert_close(actual, expected.reshape(actual.shape) if expected.numel() == actual.numel() else expected,
                               rtol=rtol, atol=atol, msg=lambda m: f"{msg}: {m}")
