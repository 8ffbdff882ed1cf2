"""Without the demo extra (pillow, matplotlib, pycocotools, tqdm) the commands that need it say
which extra to install (``pip install 'detloss[demo]'``) instead of raising ModuleNotFoundError.
The missing module is simulated: ``sys.modules[name] = None`` makes its import fail, and the
tools modules are dropped from ``sys.modules`` so that they are imported afresh."""
from __future__ import annotations

import sys

import pytest

from detloss.tools.cli import main
from detloss.tools.extras import DEMO, MissingExtraError, require


@pytest.fixture(autouse=True)
def _restore_modules():
    """Whatever is imported while a module is missing is dropped afterwards."""
    saved = dict(sys.modules)
    yield
    for name in [n for n in sys.modules if n not in saved]:
        del sys.modules[name]
    sys.modules.update(saved)


def _without(monkeypatch, module):
    monkeypatch.setitem(sys.modules, module, None)
    for name in list(sys.modules):
        if name.startswith("detloss.tools.") and name not in ("detloss.tools.cli", "detloss.tools.extras"):
            monkeypatch.delitem(sys.modules, name)


@pytest.mark.parametrize("module, distribution", [("PIL", "pillow"), ("matplotlib", "matplotlib"),
                                                  ("pycocotools", "pycocotools"), ("tqdm", "tqdm")])
def test_train_without_the_demo_extra(tmp_path, capsys, monkeypatch, module, distribution):
    _without(monkeypatch, module)
    rc = main(["train", "--steps", "1", "--project", str(tmp_path), "--name", "run"])
    err = capsys.readouterr().err
    assert rc == 2
    assert len(err.strip().splitlines()) == 1, err
    assert distribution in err and "pip install 'detloss[demo]'" in err
    assert not (tmp_path / "run").exists()


def _labels(tmp_path):
    p = tmp_path / "labels.txt"
    p.write_text("0 0.5 0.5 0.2 0.2\n")
    return p


@pytest.mark.parametrize("flag", ["--png", "--image"])
def test_assign_picture_without_pillow(tmp_path, capsys, monkeypatch, flag):
    _without(monkeypatch, "PIL")
    rc = main(["assign", "yolov5", "--labels", str(_labels(tmp_path)), flag, str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert "pillow" in err and "pip install 'detloss[demo]'" in err


def test_assign_table_needs_no_extra(tmp_path, capsys, monkeypatch):
    _without(monkeypatch, "PIL")
    rc = main(["assign", "yolov5", "--labels", str(_labels(tmp_path))])
    out = capsys.readouterr().out
    assert rc == 0 and "positives" in out


def test_python_api_raises_an_import_error_naming_the_extra(monkeypatch):
    _without(monkeypatch, "PIL")
    from detloss.tools.viz import assignment_picture

    with pytest.raises(MissingExtraError, match=r"pillow .*pip install 'detloss\[demo\]'"):
        assignment_picture("yolov5", [[0, 0.5, 0.5, 0.2, 0.2]])
    assert issubclass(MissingExtraError, ImportError)


def test_require_passes_when_installed():
    require(DEMO, "the demo")  # the dev extra installs all of them
