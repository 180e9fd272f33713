"""The benchmark scripts stay runnable: each imports, answers ``--help`` (those with a command line), names its run
command in its docstring, and the GPU check parses; the arithmetic the benchmarks report is checked by hand."""

import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


@pytest.fixture
def benchmarks_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # as `python benchmarks/x.py` puts it first
    monkeypatch.syspath_prepend(str(ROOT))


# a script without a command line is only imported; data_throughput.py's imports (the data stack) take ~5-10 s
@pytest.mark.parametrize("script", [pytest.param(p, marks=pytest.mark.slow) if "argparse" not in p.read_text() else p
                                    for p in BENCHMARKS], ids=[p.name for p in BENCHMARKS])
def test_script_imports_and_answers_help(script, benchmarks_on_path, monkeypatch, capsys):
    source = script.read_text()
    assert f"python benchmarks/{script.name}" in source.split('"""')[1], "the docstring names no run command"
    if "argparse" not in source:  # no command line (e.g. data_throughput.py): importing it must work
        runpy.run_path(str(script), run_name="benchmark_import")
        return
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_gpu_check_parses_and_refuses_without_a_gpu():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible: the check would run")
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "/dev/null"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr


def test_exit_speed_ceiling_by_hand(benchmarks_on_path):
    from exit_speed import ceiling, costs

    f0, fr = costs(3.0, 10.0, 8)  # t(1) = F0 + Fr = 3, t(8) = F0 + 8 Fr = 10
    assert (f0, fr) == pytest.approx((2.0, 1.0))
    assert ceiling(f0, fr, 8, 4.0) == pytest.approx(10 / 6)
    assert ceiling(f0, fr, 8, 8.0) == pytest.approx(1.0)


def test_decode_speed_baseline_is_its_own_package(benchmarks_on_path, tmp_path):
    """'today' is the commit's code under another name: nothing of it resolves to this checkout's parcae."""
    from decode_speed import BASELINE_PACKAGE, baseline_package

    package = baseline_package("HEAD", tmp_path)
    if isinstance(package, str):
        pytest.skip(package)  # e.g. not a git checkout
    try:
        import importlib

        engine = importlib.import_module(f"{BASELINE_PACKAGE}.inference.engine")
        assert Path(engine.__file__).is_relative_to(tmp_path)
        outside = [name for name, module in sys.modules.items()
                   if name.startswith(BASELINE_PACKAGE) and getattr(module, "__file__", None)
                   and not Path(module.__file__).is_relative_to(tmp_path)]
        assert not outside
        assert engine.Engine.__module__ == f"{BASELINE_PACKAGE}.inference.engine"
        assert engine.LoopedLM.__module__.startswith(BASELINE_PACKAGE)
    finally:
        for name in [n for n in sys.modules if n.startswith(BASELINE_PACKAGE)]:
            del sys.modules[name]
        sys.path.remove(str(tmp_path))
