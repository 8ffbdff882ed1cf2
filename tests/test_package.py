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


def test_wheel_holds_the_package_only(tmp_path):
    """``pip wheel . --no-deps`` on a copy of the sources (so that no stale build/ folder can
    leak into it): the wheel has detloss (core and tools layer) and its metadata, and no
    benchmark code, no detloss_bench and no tests."""
    import shutil
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    src = tmp_path / "src"
    shutil.copytree(root / "src", src / "src", ignore=shutil.ignore_patterns("*.egg-info", "__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    for extra in ("benchmarks", "tests"):  # present beside the package, as in the repository
        shutil.copytree(root / extra, src / extra, ignore=shutil.ignore_patterns("__pycache__", "data"))
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = list((tmp_path / "dist").glob("detloss-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    top = {n.split("/")[0] for n in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"detloss"}, top
    assert sum(t.endswith(".dist-info") for t in top) == 1, top
    for bad in ("bench", "detloss_bench", "benchmarks", "tests", "conftest", "test_"):
        assert not [n for n in names if f"/{bad}" in "/" + n], [n for n in names if f"/{bad}" in "/" + n]
    for wanted in ("detloss/__init__.py", "detloss/py.typed", "detloss/losses/registry.py",
                   "detloss/tools/cli.py", "detloss/tools/explain/__init__.py", "detloss/tools/extras.py"):
        assert wanted in names, wanted
