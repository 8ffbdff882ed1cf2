"""Smoke test of the kernels benchmark: ``main(["--quick"])`` runs and prints its tables."""
from __future__ import annotations

from detloss_bench.kernels import main


def test_bench_kernels_quick(eager, capsys):
    assert main(["--quick", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    for word in ("sigmoid_focal_loss", "varifocal_loss", "iou_loss ciou yolov5", "bandwidth bound", "speedup"):
        assert word in out
