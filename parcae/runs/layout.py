"""The names of the files in a run directory, in one place: what ``parcae fit`` and ``parcae import`` write, what
the evaluation verbs add, and how a checkpoint's name says its step.

    <run>/config.yaml          the run's configuration (LightningCLI's saved config; imported runs: written by import)
    <run>/tokenizer.json       the run's own copy of its tokenizer (every verb finds it here, from any folder)
    <run>/last.ckpt            the newest checkpoint (a pointer to the newest state, not a competitor)
    <run>/step=0000100.ckpt    the checkpoint after optimizer step 100 (a folder with meta.pt when sharded)
    <run>/import.json          where an imported run came from
    <run>/.fit.lock            held by the one parcae fit writing the run
    <run>/test_loops.json|csv|png, test_loops_fit.json, perplexity_<text>.json, core_T<n>.json, lm_eval_T<n>.json

Staging files of an interrupted write start with a dot (``.step=0000100.ckpt.tmp-<pid>``) and are never taken for
checkpoints.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

CONFIG_FILE = "config.yaml"
HPARAMS_FILE = "hparams.yaml"
TOKENIZER_FILE = "tokenizer.json"
IMPORT_RECORD = "import.json"
LOCK_FILE = ".fit.lock"
LAST_CHECKPOINT = "last.ckpt"
CHECKPOINT_SUFFIX = ".ckpt"
SHARDED_METADATA = "meta.pt"  # Lightning's name for the non-tensor part of a distributed (sharded) checkpoint
STEP_FILENAME = "step={step:07d}"  # ModelCheckpoint's filename template: step=0000100.ckpt

# Result files the evaluation verbs write beside a checkpoint (or into --output_dir).
TEST_LOOPS_JSON = "test_loops.json"
TEST_LOOPS_CSV = "test_loops.csv"
TEST_LOOPS_PLOT = "test_loops.png"
TEST_LOOPS_FIT = "test_loops_fit.json"
TEST_LOOPS_FIT_PLOT = "test_loops_fit.png"

# step=N.ckpt, and the names older versions let Lightning write when it lost track of a moved run (last-v1.ckpt,
# step=N-v1.ckpt): still read, so that a run damaged that way resumes from its newest state; never written.
_STEP = re.compile(r"^step=(\d+)(?:-v\d+)?\.ckpt$")
_LAST = re.compile(r"^last(?:-v\d+)?\.ckpt$")


def step_checkpoint_name(step: int) -> str:
    return STEP_FILENAME.format(step=step) + CHECKPOINT_SUFFIX


def step_of_name(name: str) -> Optional[int]:
    """The step a ``step=N.ckpt`` name says, None for any other name."""
    m = _STEP.match(name)
    return int(m.group(1)) if m else None


def is_last_name(name: str) -> bool:
    return bool(_LAST.match(name))


def checkpoint_files(run_dir: str | Path) -> list[Path]:
    """Every checkpoint of a run directory (last, step=N; files or sharded folders), staging files excluded."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    return sorted(p for p in run_dir.iterdir() if is_last_name(p.name) or step_of_name(p.name) is not None)


def has_checkpoint(run_dir: str | Path) -> bool:
    return bool(checkpoint_files(run_dir))


def is_sharded_checkpoint(path: str | Path) -> bool:
    """A sharded (FSDP) checkpoint is a folder holding one shard per rank plus ``meta.pt``."""
    path = Path(path)
    return path.is_dir() and (path / SHARDED_METADATA).is_file()


def perplexity_result(text: str | Path, exit_rule: bool = False) -> str:
    """``perplexity_<text name>.json`` (``_exit`` for the early-exit measurement)."""
    return f"perplexity_{Path(text).stem}{'_exit' if exit_rule else ''}.json"


def core_result(tasks: str, loops: int) -> str:
    """``core_T8.json`` / ``core_extended_T8.json`` / ``<tasks file stem>_T8.json``."""
    name = Path(tasks).stem if str(tasks).endswith((".yaml", ".yml")) else tasks
    return f"{name}_T{loops}.json"


def lm_eval_result(loops: int) -> str:
    return f"lm_eval_T{loops}.json"
