"""Smoke tests of the detector-loss benchmark suites at tiny sizes, in the main environment.

Each suite runs its peer's own code when the peer's framework imports (the integrations
environment; integration_tests/test_bench_peers.py checks that case) and otherwise prints
detloss's own figures and says the peer is missing; which of the two applies here is decided by
whether the framework is installed, and each is asserted. The yolov3 suite's peer is a
transcription (darknet has no runnable Python peer) and always runs.
"""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

import detloss_bench
from detloss_bench import _common, fcos, retinanet, ssd, yolov3, yolov5, yolov8

QUICK = ["--quick", "--threads", "1"]
PEER_PACKAGES = {"yolov5": "yolov5", "yolov8": "ultralytics", "fcos": "torchvision", "retinanet": "torchvision",
                 "ssd": "torchvision"}
SUITES = {"yolov5": yolov5, "yolov8": yolov8, "fcos": fcos, "retinanet": retinanet, "ssd": ssd}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


@pytest.fixture(autouse=True)
def _one_thread():
    yield
    torch.set_num_threads(1)  # the suites set their --threads; the test suite runs on one


@pytest.mark.parametrize("name", sorted(SUITES))
def test_suite_runs_with_or_without_its_peer(name, capsys, tmp_path):
    out_json = tmp_path / "r.json"
    assert SUITES[name].main(QUICK + ["--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "boxes/img" in out and "fwd+bwd" in out and "scaling 2 -> 5 boxes/img" in out
    doc = json.loads(out_json.read_text())
    assert doc["suite"] == name and [r["boxes"] for r in doc["rows"]] == [2, 5]
    assert all(r["detloss"]["fwd_bwd_s"] > 0 for r in doc["rows"])
    if _installed(PEER_PACKAGES[name]):
        assert "the original's own code" in out and "equal:" in out
        assert all(r["peer"] is not None for r in doc["rows"])
    else:
        assert "peer missing: " in out and "detloss's own figures only" in out
        assert doc["peer_missing"] and all(r["peer"] is None for r in doc["rows"])


@pytest.mark.parametrize("name", sorted(SUITES))
def test_peers_option_requires_the_peer(name, capsys):
    code = SUITES[name].main(QUICK + ["--peers", "--boxes", "2"])
    err = capsys.readouterr().err
    if _installed(PEER_PACKAGES[name]):
        assert code == 0
    else:
        assert code == 2 and f"{name}: error:" in err and "make bench-peers" in err


def test_yolov3_suite_checks_against_the_transcription_and_says_so(capsys):
    assert yolov3.main(QUICK) == 0
    out = capsys.readouterr().out
    assert "TRANSCRIPTION" in out and "not the original's code" in out
    assert out.count("equal: gradients") == 2


def test_a_failed_equality_check_stops_before_timing(capsys):
    x = torch.randn(5, requires_grad=True)
    ours = _common.Side("detloss", lambda: (x ** 2).sum(), [x])
    wrong = _common.Side("peer", lambda: (x ** 2).sum(), [x], gradients=lambda: [3 * x])  # not 2 x
    args = type("A", (), {"peers": False, "boxes": [1], "repeats": 1, "warmup": 0, "json": None})()
    code = _common.run_suite("toy", args, "toy", "peer", lambda: None, lambda nb, peer: (ours, wrong))
    out = capsys.readouterr()
    assert code == 1 and "equality check failed, nothing was timed" in out.err and "gradient 0" in out.err
    assert "boxes/img" not in out.out
    with pytest.raises(_common.EqualityError, match="total"):
        _common.check_equal(ours, _common.Side("peer", lambda: (x ** 2).sum() + 1, [x]))
    with pytest.raises(_common.EqualityError, match="term a"):
        _common.check_equal(_common.Side("d", ours.loss, [x], terms=lambda: {"a": 1.0}),
                            _common.Side("p", ours.loss, [x], terms=lambda: {"a": 1.5}))
    assert _common.check_equal(ours, _common.Side("peer", lambda: x.pow(2).sum(), [x])).startswith("equal:")


def test_alternating_medians_runs_each_function_in_turn():
    calls = []
    medians = _common.alternating_medians([lambda: calls.append("a"), lambda: calls.append("b")], repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4 and len(medians) == 2 and all(m >= 0 for m in medians)


def test_run_py_drops_peers_for_a_suite_without_the_option(monkeypatch, capsys):
    import argparse
    import types

    seen = {}
    fake = types.ModuleType("detloss_bench.fake")
    fake.add_arguments = lambda p: p.add_argument("--quick", action="store_true")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(__import__("sys").modules, "detloss_bench.fake", fake)
    monkeypatch.setattr(detloss_bench, "SUITES", ("fake",))
    assert detloss_bench.run(argparse.Namespace(suite="all", rest=["--quick", "--peers"])) == 0
    assert seen["argv"] == ["--quick"] and "takes no --peers" in capsys.readouterr().out
    assert detloss_bench._takes(yolov5, "--peers") and not detloss_bench._takes(fake, "--peers")


def test_the_equality_check_runs_on_one_thread():
    """Repeated-index writes in a peer (yolov5's tobj) are serial, last writer wins, only on one thread."""
    seen = []
    x = torch.randn(3, requires_grad=True)

    def loss():
        seen.append(torch.get_num_threads())
        return x.sum()

    torch.set_num_threads(2)
    _common.check_equal(_common.Side("d", loss, [x]), _common.Side("p", loss, [x]))
    assert seen and set(seen) == {1} and torch.get_num_threads() == 2


@pytest.mark.parametrize("name", ["retinanet", "ssd"])
def test_anchor_suites_print_the_growth_of_the_matching(name, capsys):
    assert SUITES[name].main(QUICK) == 0
    out = capsys.readouterr().out
    assert "matching alone" in out and "candidates" in out and "anchors x boxes" in out
    assert "growth 2 -> 5 boxes/img: candidates x" in out
