"""Start-up time of the ``parcae`` command from a cold process: ``parcae --help`` and a one-token ``parcae generate``.

Each measurement is a fresh ``python -m parcae ...`` process (what the console script runs), timed from start to
exit, repeated; the median is reported with the minimum and maximum. The generate runs use a run directory this
script writes first: the ``mini-demo`` preset (the model of the README's demo) with random weights, saved as
``parcae import`` saves a model, with the Shakespeare tokenizer. The load average is printed before and after,
since on a shared machine other processes slow every figure down.

    python benchmarks/startup.py                                  # this checkout, 5 repeats of each
    python benchmarks/startup.py --repeats 9 --preset parcae-debug
    PYTHONPATH=/path/to/other/checkout python benchmarks/startup.py --label before   # another version of parcae

The children inherit PYTHONPATH, so the second form times that checkout's ``parcae`` (the run directory is written
by whichever parcae the script itself imports; the checkpoint format is the same). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

TOKENIZER = Path(__file__).resolve().parent.parent / "data_prep" / "corpus" / "shakespeare_tokenizer.json"


def make_run(folder: Path, preset_name: str) -> Path:
    """A run directory holding one checkpoint of ``preset_name`` (random weights) and its tokenizer."""
    import torch

    from parcae.model import LoopedLM, preset
    from parcae.runs import lightning_checkpoint, save_atomically

    torch.manual_seed(0)
    model = LoopedLM(preset(preset_name)).eval()
    run = folder / preset_name
    run.mkdir(parents=True)
    save_atomically(lightning_checkpoint(model), run / "last.ckpt")
    shutil.copy(TOKENIZER, run / "tokenizer.json")
    return run


def time_command(argv: list[str], repeats: int, cwd: Path) -> list[float]:
    """Wall seconds of ``repeats`` cold runs of ``python -m parcae <argv>`` (each must exit 0)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        # cwd: a folder with no parcae in it, so that `-m parcae` finds the package PYTHONPATH or the install names
        done = subprocess.run([sys.executable, "-m", "parcae", *argv], capture_output=True, text=True, cwd=cwd)
        seconds.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"parcae {' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="cold processes per command (default 5)")
    parser.add_argument("--preset", default="mini-demo", help="model of the generate run (default mini-demo)")
    parser.add_argument("--label", default="", help="a name for this set of figures (e.g. before / after)")
    args = parser.parse_args()
    import parcae  # the package the children run too (same sys.path but for the working folder)

    with tempfile.TemporaryDirectory(prefix="parcae-startup-") as tmp:
        run = make_run(Path(tmp), args.preset)
        commands = {
            "parcae --help": ["--help"],
            "parcae generate (1 token)": ["generate", "--ckpt_path", str(run), "--prompt", "ROMEO:",
                                          "--max_new_tokens", "1", "--device", "cpu", "--temperature", "0"],
        }
        load_before = os.getloadavg()
        time_command(["--help"], 1, Path(tmp))  # warm the file cache once; every timed run is a new process
        results = {name: time_command(argv, args.repeats, Path(tmp)) for name, argv in commands.items()}
        load_after = os.getloadavg()
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"{args.label + ': ' if args.label else ''}{stamp}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"Python {platform.python_version()}, parcae from {Path(parcae.__file__).parent}")
    print(f"load average (1/5/15 min) before {'/'.join(f'{x:.2f}' for x in load_before)}, "
          f"after {'/'.join(f'{x:.2f}' for x in load_after)}")
    print(f"{'command':<28} {'median s':>9} {'min s':>7} {'max s':>7}  ({args.repeats} cold processes each)")
    for name, seconds in results.items():
        print(f"{name:<28} {statistics.median(seconds):>9.2f} {min(seconds):>7.2f} {max(seconds):>7.2f}")


if __name__ == "__main__":
    main()
