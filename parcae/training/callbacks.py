"""Training-run furniture: atomic checkpoint writes, a step-based rich progress bar, the run summary and the
TensorBoard layout (custom scalars, hyperparameters under ``hp/``)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import RichProgressBar


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write the checkpoint next to its destination, fsync, then ``os.replace``: a kill during a save leaves the
    previous file intact. (Lightning's default stages in the system temp dir and *moves* the file, which is a
    copy, not a rename, when that is another filesystem.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed mid-save
            stale.unlink(missing_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)


class StepProgressBar(RichProgressBar):
    """Rich progress over optimizer steps (``trainer.max_steps``), not per data epoch, so the total is right
    when training by steps on a streaming dataset and after a mid-epoch resume."""

    @property
    def total_train_batches(self):
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return super().total_train_batches

    def _get_train_description(self, current_epoch: int) -> str:
        if self.trainer.max_steps and self.trainer.max_steps > 0:
            return "train (steps)"
        return super()._get_train_description(current_epoch)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.max_steps and trainer.max_steps > 0 and self.train_progress_bar_id is not None:
            return  # one bar for the whole run
        super().on_train_epoch_start(trainer, pl_module)
        if trainer.max_steps and trainer.max_steps > 0:
            self._update(self.train_progress_bar_id, trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if trainer.max_steps and trainer.max_steps > 0:
            self._update(self.train_progress_bar_id, trainer.global_step)


def parameter_table(module) -> "Any":
    from rich.table import Table

    from parcae.model import flops_per_token

    arch = module.arch
    counts = module.net.parameter_counts()
    table = Table(title=f"{arch.name}", show_header=True)
    table.add_column("part")
    table.add_column("parameters", justify="right")
    for part, n in counts.items():
        if part != "total" and n:
            table.add_row(part.replace("_", " "), f"{n:,}")
    table.add_row("[bold]total[/bold]", f"[bold]{counts['total']:,}[/bold]")
    dm = module.trainer.datamodule if module._trainer is not None else None
    seq_len = getattr(dm, "seq_len", arch.block_size)
    fb = flops_per_token(arch, seq_len)
    if arch.looped:
        table.add_row("loop", f"μ_rec {arch.mean_recurrence}, μ_bwd {arch.backprop_depth}, {arch.injection}, "
                              f"{arch.depth_scheme} {arch.depth_granularity}")
    table.add_row("effective depth", f"{arch.effective_depth()} blocks")
    table.add_row("FLOPs / token (train)", f"{fb.per_token / 1e6:,.1f} M")
    return table


class RunSummary(L.Callback):
    """At the start of ``fit``: a rich table of the model (parameters by part, depth, FLOPs per token) and
    the TensorBoard custom-scalar layout and hyperparameters."""

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        from rich.console import Console

        Console().print(parameter_table(pl_module))
        logger = trainer.logger
        experiment = getattr(logger, "experiment", None)
        if not hasattr(experiment, "add_custom_scalars"):
            return
        arch = pl_module.arch
        val_tags = [f"val/loss_T{t}" for t in pl_module.val_loops] if arch.looped else ["val/loss"]
        norm_tags = [f"loop/state_norm_t{t:02d}" for t in range(0, 2 * arch.mean_recurrence + 1)]
        layout = {"loss": {"val loss by loops": ["Multiline", val_tags],
                           "train vs val": ["Multiline", ["train/loss", "val/loss"]]}}
        if arch.looped:
            layout["loop"] = {"state norm by iteration": ["Multiline", norm_tags],
                              "stability": ["Multiline", ["loop/spectral_radius", "loop/mean_decay"]],
                              "residual": ["Multiline", ["loop/residual", "loop/rel_residual"]]}
        experiment.add_custom_scalars(layout)
        hparams = {f"arch.{k}": v for k, v in dataclasses.asdict(arch).items()}
        hparams.update({f"optimizer.{k}": str(v) if isinstance(v, tuple) else v
                        for k, v in dataclasses.asdict(pl_module.optim_config).items()})
        hparams.update({f"schedule.{k}": v for k, v in dataclasses.asdict(pl_module.schedule_config).items()})
        dm = trainer.datamodule
        for key in ("seq_len", "batch_size"):
            if hasattr(dm, key):
                hparams[f"data.{key}"] = getattr(dm, key)
        hparams["trainer.max_steps"] = trainer.max_steps
        # Metrics only under hp/: a placeholder logged here never lands on the real val/ curves.
        logger.log_hyperparams(hparams, metrics={"hp/val_loss": float("nan")})
