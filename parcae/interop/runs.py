"""Run directories for models that were not trained here (imported releases), and reading any run back.

An imported run directory looks like one ``parcae fit`` writes, so every verb that takes ``--ckpt_path`` works:

    <runs_dir>/<run_name>/last.ckpt       a Lightning checkpoint of LoopedLMModule (weights, hyper-parameters)
    <runs_dir>/<run_name>/config.yaml     model.arch + data (no shard folders; data.tokenizer = the tokenizer below)
    <runs_dir>/<run_name>/tokenizer.json  the model's tokenizer (+ tokenizer_config.json, special_tokens_map.json)
    <runs_dir>/<run_name>/import.json     where it came from: source, files and their sha256, the official config

It is written into a hidden staging folder beside it and renamed into place at the end, so an interrupted
import leaves nothing behind under the run name.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from parcae.model import LoopedLM

from .release import InteropError

CHECKPOINT = "last.ckpt"
PROVENANCE = "import.json"


def _module_hyper_parameters(model: LoopedLM) -> dict[str, Any]:
    """The hyper-parameters LoopedLMModule saves, with its defaults for everything but the architecture."""
    from parcae.training.module import LoopedLMModule

    hp = {}
    for name, param in inspect.signature(LoopedLMModule.__init__).parameters.items():
        if name == "self":
            continue
        default = param.default
        hp[name] = dataclasses.asdict(default) if dataclasses.is_dataclass(default) else default
    hp["arch"] = dataclasses.asdict(model.config)
    return hp


def checkpoint_payload(model: LoopedLM, extra: Optional[dict] = None) -> dict[str, Any]:
    """A Lightning checkpoint of ``LoopedLMModule`` holding ``model``'s weights, at step 0 with no optimizer."""
    import lightning

    payload = {
        "epoch": 0, "global_step": 0, "pytorch-lightning_version": lightning.__version__,
        "state_dict": {f"net.{k}": v.detach().contiguous() for k, v in model.state_dict().items()},  # no copy
        "hyper_parameters": _module_hyper_parameters(model), "loops": None, "callbacks": {},
        "optimizer_states": [], "lr_schedulers": [],
        "parcae": {"micro_step": 0, "skipped_steps": 0, "nonfinite_streak": 0},
    }
    if extra:
        payload.update(extra)
    return payload


def run_config(model: LoopedLM, run_dir: Path, tokenizer: Path) -> dict[str, Any]:
    """config.yaml of an imported run: the architecture and the model's own tokenizer instead of shard folders."""
    cfg = model.config
    return {
        "seed_everything": 1234,
        "run_name": run_dir.name,
        "runs_dir": str(run_dir.parent),
        "trainer": {"accelerator": "auto", "precision": "32-true"},
        "model": {"arch": dataclasses.asdict(cfg),
                  "eval_loops": sorted({1, 2, 4, 8, cfg.mean_recurrence}) if cfg.looped else [1]},
        "data": {"datasets": [], "tokenizer": str(tokenizer), "seq_len": cfg.block_size, "batch_size": 8,
                 "num_workers": 1},
    }


def write_atomically(target: Path, fill: Callable[[Path], None], what: str) -> None:
    """Create the folder ``target`` by filling a hidden staging folder and renaming it; refuse a non-empty target."""
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise InteropError(f"{target} already exists and is not empty; choose another {what} (or delete it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        fill(staging)
        if target.exists():  # an empty folder: replace it
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_run(model: LoopedLM, run_dir: Path, tokenizer_files: dict[str, Path],
              provenance: Optional[dict[str, Any]] = None, checkpoint_extra: Optional[dict] = None) -> Path:
    """Write a run directory holding ``model`` (see the module docstring); returns its checkpoint path."""
    import yaml

    from parcae.data.tokenizer import file_sha256

    run_dir = Path(run_dir).resolve()

    def fill(staging: Path) -> None:
        for name, path in tokenizer_files.items():
            shutil.copyfile(path, staging / name)
        torch.save(checkpoint_payload(model, checkpoint_extra), staging / CHECKPOINT)
        config = run_config(model, run_dir, run_dir / "tokenizer.json")
        (staging / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        record = {"imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(provenance or {}),
                  "tokenizer_sha256": file_sha256(staging / "tokenizer.json")}
        (staging / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")

    write_atomically(run_dir, fill, "--run_name")
    return run_dir / CHECKPOINT


def find_checkpoint(run: str | Path) -> Path:
    """A checkpoint file, or a run directory's last.ckpt (else its newest step=*.ckpt)."""
    run = Path(run)
    if run.is_file():
        return run
    if not run.is_dir():
        raise InteropError(f"{run}: no such run directory or checkpoint")
    if (run / CHECKPOINT).is_file():
        return run / CHECKPOINT
    steps = sorted(run.glob("step=*.ckpt"))
    if not steps:
        raise InteropError(f"{run} holds no checkpoint (last.ckpt or step=*.ckpt)")
    return steps[-1]
