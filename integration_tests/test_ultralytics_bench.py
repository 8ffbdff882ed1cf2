"""Smoke test of the YOLO26 benchmark against ultralytics' criterion (``--quick`` sizes): it checks
that both criteria agree, then prints its table."""
from detloss_bench.yolo26 import main


def test_bench_yolo26_quick(capsys):
    assert main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "detloss DetectionLoss (e2e) vs ultralytics E2ELoss" in out
    assert "boxes/img" in out and "SKIPPED" not in out


def test_bench_yolov8_head_quick(capsys):
    assert main(["--quick", "--cfg", "yolov8n.yaml"]) == 0
    assert "DetectionLoss (single) vs ultralytics v8DetectionLoss" in capsys.readouterr().out
