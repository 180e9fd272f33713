"""parcae installs anywhere: a wheel built from this checkout, installed into a fresh virtual environment (no
``-e``), runs from a folder outside the checkout — the data files it reads are package data.

The fresh environment borrows the already-installed dependencies (torch, Lightning, ...) through a ``.pth`` line
instead of downloading them again; parcae itself comes only from the wheel (checked).
"""

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from conftest import write_recipe

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # builds a wheel and a virtual environment, runs its parcae


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory):
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(work / "dist"), str(ROOT)], check=True, capture_output=True)
    wheel = next((work / "dist").glob("parcae-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", str(work / "venv")], check=True)
    venv_python = work / "venv" / "bin" / "python"
    # the fresh environment sees no checkout: with PYTHONPATH naming one (its parcae.egg-info), pip would call
    # parcae "already satisfied" and install nothing
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{work / 'venv' / 'bin'}{os.pathsep}{env['PATH']}"
    site = subprocess.run([str(venv_python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, env=env).stdout.strip()
    Path(site, "parcae_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv_python), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)],
                   check=True, capture_output=True, env=env)
    outside = work / "elsewhere"
    outside.mkdir()
    return wheel, work / "venv" / "bin", env, outside, Path(site)


def run(bindir, env, cwd, *args, timeout=600):
    result = subprocess.run([str(bindir / "parcae"), *args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


def test_the_wheel_carries_every_data_file(wheel_env):
    wheel = wheel_env[0]
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = [p for p in (ROOT / "parcae").rglob("*") if p.is_file() and p.suffix in (".yaml", ".json")]
    shipped += [p for d in ("recipes", "configs") for p in (ROOT / d).rglob("*.yaml")]
    for path in shipped:
        rel = path.relative_to(ROOT).as_posix()
        packaged = rel if rel.startswith("parcae/") else f"parcae/{rel}"
        assert packaged in names, f"{rel} is not in the wheel"
    assert any(n.startswith("data_prep/corpus/") for n in names)


def test_parcae_runs_from_the_installed_wheel(wheel_env, small_shards):
    _, bindir, env, outside, site = wheel_env
    where = subprocess.run([str(bindir / "python"), "-c", "import parcae; print(parcae.__file__)"], cwd=outside,
                           env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(site), f"parcae imported from {where}, not from the wheel"
    assert "extra commands" in run(bindir, env, outside, "--help")
    assert "table5" in run(bindir, env, outside, "report", "--list")
    assert "144,323,136" in run(bindir, env, outside, "model", "parcae-140m", "--meta")
    # the packaged recipes and their configs/ pieces resolve inside the installation
    printed = run(bindir, env, outside, "fit", "--config", str(site / "parcae/recipes/mini/debug.yaml"),
                  "--print_config")
    assert "name: parcae-debug" in printed
    recipe = write_recipe(outside / "tiny.yaml", small_shards, outside / "runs", max_steps=1)
    run(bindir, env, outside, "fit", "--config", str(recipe))
    assert (outside / "runs" / "tiny" / "last.ckpt").is_file()
