"""Smoke test of the DETR-family benchmark (tiny sizes; it checks detloss against the peers that
are installed, and says which are not)."""
from detloss_bench import SUITES, detr


def test_bench_quick(capsys):
    assert "detr" in SUITES
    assert detr.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for what in ("DETR", "RT-DETRv2", "RT-DETR ultralytics", "matcher", "loss fwd+bwd"):
        assert what in out
