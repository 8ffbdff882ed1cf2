"""Fixtures for the fused-kernel tests: run the eager closed-form pass (fast) or the compiled one."""
from __future__ import annotations

import pytest


@pytest.fixture
def eager(monkeypatch):
    """Fused path on for every size, eager closed-form pass (no torch.compile)."""
    monkeypatch.setenv("DETLOSS_FUSED", "1")
    monkeypatch.setenv("DETLOSS_COMPILE", "0")
    monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "0")


@pytest.fixture
def compiled(monkeypatch):
    """Fused path on for every size, compiled with torch.compile(dynamic=True)."""
    monkeypatch.setenv("DETLOSS_FUSED", "1")
    monkeypatch.setenv("DETLOSS_COMPILE", "1")
    monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "0")
