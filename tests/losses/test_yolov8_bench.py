"""Smoke test of the YOLOv8 benchmark (tiny sizes; it also checks both assignment ways agree)."""
from detloss_bench import yolov8


def test_bench_quick(capsys):
    assert yolov8.main(["--quick"]) == 0
    out = capsys.readouterr().out
    assert "candidates" in out and "assigner" in out and "loss fwd+bwd" in out
