"""Smoke test of the kernels benchmark: ``main(["--quick"])`` runs and prints its tables."""
from __future__ import annotations

from detloss_bench.kernels import main


def test_bench_kernels_quick(monkeypatch, capsys):
    monkeypatch.setenv("DETLOSS_FUSED", "1")  # the fused kernels' eager closed-form pass, every size
    monkeypatch.setenv("DETLOSS_COMPILE", "0")
    monkeypatch.setenv("DETLOSS_FUSED_MIN_NUMEL", "0")
    assert main(["--quick", "--repeats", "1", "--warmup", "0", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    for word in ("sigmoid_focal_loss", "varifocal_loss", "iou_loss ciou yolov5", "bandwidth bound", "speedup"):
        assert word in out
