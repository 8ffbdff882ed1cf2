"""The package imports, exposes its public names and its command answers --help."""
import subprocess
import sys

import detloss


def test_public_names():
    assert detloss.__version__
    out = detloss.LossOutput(total=__import__("torch").tensor(1.5))
    assert out.components == {} and float(out.total) == 1.5


def test_cli_help():
    r = subprocess.run([sys.executable, "-m", "detloss", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for name in ("explain", "assign", "train"):
        assert name in r.stdout


def test_core_never_imports_the_tools_layer():
    code = (
        "import sys, detloss, detloss.functional, detloss.nn, detloss.kernels, detloss.assign.base, "
        "detloss.losses.registry\n"
        "print(sorted(m for m in sys.modules if m.startswith('detloss.tools')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
