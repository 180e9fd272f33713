"""Run directories for models that were not trained here (imported releases).

An imported run directory looks like one ``parcae fit`` writes, so every verb that takes ``--ckpt_path`` works:

    <runs_dir>/<run_name>/last.ckpt       a checkpoint LoopedLMModule loads (parcae.runs.lightning_checkpoint)
    <runs_dir>/<run_name>/config.yaml     model.arch + data (no shard folders; data.tokenizer = the tokenizer below)
    <runs_dir>/<run_name>/tokenizer.json  the model's tokenizer (+ tokenizer_config.json, special_tokens_map.json)
    <runs_dir>/<run_name>/import.json     where it came from: source, files and their sha256, the official config

It is written into a hidden staging folder beside it and renamed into place at the end, so an interrupted
import leaves nothing behind under the run name.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path
from typing import Any, Optional

from parcae.model import LoopedLM
from parcae.runs import (CONFIG_FILE, IMPORT_RECORD, LAST_CHECKPOINT, TOKENIZER_FILE, lightning_checkpoint,
                         save_atomically, write_folder_atomically)

CHECKPOINT = LAST_CHECKPOINT
PROVENANCE = IMPORT_RECORD


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


def write_run(model: LoopedLM, run_dir: Path, tokenizer_files: dict[str, Path],
              provenance: Optional[dict[str, Any]] = None, checkpoint_extra: Optional[dict] = None) -> Path:
    """Write a run directory holding ``model`` (see the module docstring); returns its checkpoint path."""
    import yaml

    from parcae.data.tokenizer import file_sha256

    run_dir = Path(run_dir).resolve()

    def fill(staging: Path) -> None:
        for name, path in tokenizer_files.items():
            shutil.copyfile(path, staging / name)
        save_atomically(lightning_checkpoint(model, extra=checkpoint_extra), staging / CHECKPOINT)
        config = run_config(model, run_dir, run_dir / TOKENIZER_FILE)
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(config, sort_keys=False))
        record = {"imported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **(provenance or {}),
                  "tokenizer_sha256": file_sha256(staging / TOKENIZER_FILE)}
        (staging / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")

    write_folder_atomically(run_dir, fill, "--run_name")
    return run_dir / CHECKPOINT
