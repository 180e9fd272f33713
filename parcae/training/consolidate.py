"""``parcae consolidate RUN_DIR``: turn a sharded (FSDP) checkpoint folder into one checkpoint file.

Sharded training writes each checkpoint as a folder (``last.ckpt/``, ``step=0001000.ckpt/``) with one shard per
rank plus ``meta.pt`` (step, loop and data positions, hyperparameters). Resuming uses the folder itself on the
same number of ranks. ``test``, ``validate``, ``predict``, the evaluation verbs and ``export`` need one file:

    parcae consolidate checkpoints/table5_1.3b                      # last.ckpt/ -> last-consolidated.ckpt
    parcae consolidate checkpoints/table5_1.3b --ckpt_name step=0010000.ckpt
    parcae test --ckpt_path checkpoints/table5_1.3b/last-consolidated.ckpt --loops 1-16

The file sits in the run directory (beside ``config.yaml``, which the other verbs read) and holds the full
weights and the training metadata; the optimizer state is left out (resume from the folder instead, or pass
``--with_optimizer true`` to keep it, keyed by parameter name). It runs on one CPU process without a process group
and needs the whole model in CPU memory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from parcae.errors import UsageError
from parcae.runs import is_sharded_checkpoint, newest_checkpoint, save_atomically
from parcae.runs.errors import CheckpointError
from parcae.runs.layout import SHARDED_METADATA


def consolidate(folder: str | Path, output: Optional[str | Path] = None, with_optimizer: bool = False) -> Path:
    """Gather the shards of ``folder`` into ``output`` (default ``<run dir>/<name>-consolidated.ckpt``)."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    folder = Path(folder)
    if not is_sharded_checkpoint(folder):
        raise ValueError(f"{folder} is not a sharded checkpoint folder (no {SHARDED_METADATA} inside)")
    output = Path(output) if output else folder.parent / f"{folder.name.removesuffix('.ckpt')}-consolidated.ckpt"
    checkpoint = _load_distributed_checkpoint(folder)  # full tensors on CPU, plus meta.pt's entries
    optimizers = sorted(k for k in checkpoint if k.startswith("optimizer_"))
    states = [checkpoint.pop(k) for k in optimizers]
    if with_optimizer:
        checkpoint["sharded_optimizer_states"] = states  # keyed by parameter name (torch.distributed.checkpoint)
    save_atomically(checkpoint, output, "consolidated checkpoint")
    return output


def _pick(run_dir: Path, name: Optional[str]) -> Path:
    if is_sharded_checkpoint(run_dir):
        return run_dir
    if not run_dir.is_dir():
        raise ValueError(f"{run_dir}: no such run directory")
    if name:
        if not is_sharded_checkpoint(run_dir / name):
            raise ValueError(f"{run_dir / name} is not a sharded checkpoint folder")
        return run_dir / name
    try:  # the run's newest sharded checkpoint, by the rule every verb uses (parcae.runs.newest_checkpoint)
        return newest_checkpoint(run_dir, only_sharded=True).path
    except CheckpointError as err:
        raise ValueError(f"{err} (single-file checkpoints need no consolidation)") from None


def consolidate_command(run_dir: Path, /, *, ckpt_name: Optional[str] = None, output_file: Optional[str] = None,
                        with_optimizer: bool = False) -> None:
    """Turn a sharded (FSDP) checkpoint folder into one checkpoint file.

    Args:
        run_dir: run directory (or a sharded checkpoint folder itself).
        ckpt_name: checkpoint folder in RUN_DIR (default: last.ckpt, else the latest step=*.ckpt).
        output_file: default: RUN_DIR/<name>-consolidated.ckpt.
        with_optimizer: also keep the optimizer state (keyed by parameter name).
    """
    try:
        folder = _pick(Path(run_dir), ckpt_name)
    except ValueError as err:
        raise UsageError(str(err)) from None
    print(f"[parcae] consolidating {folder} ...", flush=True)
    output = consolidate(folder, output_file, with_optimizer)
    print(f"[parcae] wrote {output} ({output.stat().st_size / 2**20:,.1f} MiB)")

