"""The worked examples of the background write-ups, each against the number printed there (1e-4)."""
from __future__ import annotations

import torch

import detloss.functional as F


def close(value, expected):
    torch.testing.assert_close(torch.as_tensor(value, dtype=torch.float64),
                               torch.as_tensor(expected, dtype=torch.float64), rtol=0, atol=1e-4)


def test_bce_with_logits_constant_logits():
    close(F.bce_with_logits(torch.full((10, 64), 1.5), torch.ones(10, 64)), 0.2014)


def test_bce_with_logits_three_logits():
    x = torch.tensor([0.7, 0.2, 0.1])
    close(torch.sigmoid(x), [0.6682, 0.5498, 0.5250])
    close(F.bce_with_logits(x, torch.tensor([1.0, 0.0, 0.0])), 0.6486)


def test_bce_both_ways():
    logits = torch.tensor([[1.4271, -1.8701], [-1.1962, -2.0440], [-0.4560, -1.4295]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    close(F.binary_cross_entropy(torch.sigmoid(logits), target), 0.6793)
    close(F.bce_with_logits(logits, target), 0.6793)


def test_cross_entropy_two_rows():
    x = torch.tensor([[-1.4694, -2.2030, 2.4750], [-1.0823, -0.5950, -1.4115]])
    close(F.cross_entropy(x, torch.tensor([0, 2])), 2.7550)


def test_smooth_l1_sum():
    close(F.smooth_l1_loss(torch.tensor([1.0, 5.0, 3.0, 0.5]), torch.tensor([4.0, 1.0, 0.0, 0.4]),
                           reduction="sum"), 8.5050)


def test_focal_all_negative():
    x = torch.tensor([0.2, 0.4, 0.1, 0.8, 0.2])
    close(F.sigmoid_focal_loss(x, torch.zeros(5), alpha=0.25, gamma=2.0, reduction="sum"), 1.1794)


def test_bce_per_element():
    p = torch.tensor([0.2, 0.8, 0.4])
    close(F.binary_cross_entropy(p, torch.tensor([0.0, 1.0, 0.0]), reduction="none"), [0.2231, 0.2231, 0.5108])
