"""Golden losses: the first 30 ``train/loss`` values of ``recipes/mini/debug.yaml`` (CPU, fp32) must stay as
recorded in ``tests/assets/golden_loss_debug.json`` to 1e-4.

The resume and DDP tests compare a run with itself, so a change that shifts every run alike (initialisation,
data order, the sampler, the optimizer) passes them; this file catches it. The run is the recipe unchanged
(its 200-step schedule), stopped after 30 optimizer steps by ``limit_train_batches`` with one epoch.

After a deliberate change that moves the losses, regenerate the file and say why in the commit:

    python tests/training/test_golden_loss.py --write
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "assets" / "golden_loss_debug.json"
RECIPE = ROOT / "recipes" / "mini" / "debug.yaml"
STEPS = 30
TOLERANCE = 1e-4


def debug_losses(work: Path) -> list[float]:
    """Train the debug recipe for STEPS optimizer steps in ``work`` and return its train/loss curve."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from data_prep.shakespeare import prepare
    from parcae.cli import main

    data = work / "shakespeare"
    prepare(data)
    main(["fit", "--config", str(RECIPE), "--data.datasets", f"[{data}]", "--runs_dir", str(work / "runs"),
          "--run_name", "golden", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", str(STEPS),
          "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
          "--checkpoint_every", "100000"])
    events = EventAccumulator(str(work / "runs" / "golden"), size_guidance={"scalars": 0})
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


@pytest.mark.slow
def test_debug_recipe_matches_its_golden_losses(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    losses = debug_losses(tmp_path)
    assert len(losses) == STEPS == len(golden["train_loss"])
    worst = max(abs(a - b) for a, b in zip(losses, golden["train_loss"]))
    assert worst <= TOLERANCE, (f"train/loss drifted from {GOLDEN.name} by up to {worst:.2e}; if the change is "
                                f"deliberate, regenerate it: python tests/training/test_golden_loss.py --write")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python tests/training/test_golden_loss.py --write")
    import tempfile

    import torch

    torch.set_num_threads(min(2, torch.get_num_threads()))  # as the test suite (tests/conftest.py)
    with tempfile.TemporaryDirectory() as work:
        values = debug_losses(Path(work))
    GOLDEN.write_text(json.dumps({"recipe": "recipes/mini/debug.yaml", "steps": STEPS, "device": "cpu",
                                  "precision": "32-true", "torch": torch.__version__, "train_loss": values},
                                 indent=2) + "\n")
    print(f"wrote {GOLDEN}: {len(values)} losses, first {values[0]:.4f}, last {values[-1]:.4f}")
