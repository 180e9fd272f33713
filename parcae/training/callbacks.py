"""Training-run furniture: atomic checkpoint writes under the run's own names, a step-based rich progress bar, the run summary and the
TensorBoard layout (custom scalars, hyperparameters under ``hp/``), and throughput / MFU at the sampled depth."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write the checkpoint next to its destination, fsync, then ``os.replace``: a kill during a save leaves the
    previous file intact. (Lightning's default stages in the system temp dir and *moves* the file, which is a
    copy, not a rename, when that is another filesystem.)

    ``opened``: (path, checkpoint) already opened by the command's checks; loading that path returns it (an
    evaluation's restore does not read the file a second time)."""

    def __init__(self, opened: Optional[tuple[str, dict]] = None) -> None:
        super().__init__()
        self.opened = opened

    def load_checkpoint(self, path, map_location: Optional[Any] = None, weights_only: Optional[bool] = None) -> dict:
        if self.opened is not None and isinstance(path, (str, Path)) and Path(path).resolve() == \
                Path(self.opened[0]).resolve():
            return self.opened[1]
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        from parcae.runs import save_atomically

        save_atomically(checkpoint, path, "checkpoint", run_dir=Path(path).parent)


class RunCheckpoint(ModelCheckpoint):
    """``step=N.ckpt`` every N optimizer steps plus ``last.ckpt``, under those names only.

    The run directory's own files say what is newest (``parcae.runs.newest_checkpoint``), not what Lightning
    remembered in the checkpoint: a copied or moved run (``cp -r``, ``mv``, another node) would otherwise make
    ``ModelCheckpoint`` drop its remembered ``last_model_path`` and, with its version counter, write the resumed
    state to ``last-v1.ckpt`` beside a stale ``last.ckpt``. So no ``-vN`` names are ever written, and the remembered
    paths are not restored (with ``save_top_k=-1`` and no monitor, nothing else depends on them)."""

    def __init__(self, dirpath, every_n_train_steps: int) -> None:
        from parcae.runs.layout import STEP_FILENAME

        super().__init__(dirpath=dirpath, filename=STEP_FILENAME, auto_insert_metric_name=False,
                         every_n_train_steps=every_n_train_steps, save_top_k=-1, save_last=True,
                         enable_version_counter=False)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass  # the run's files, wherever the run now lives, decide what "last" is


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


class ThroughputCallback(L.Callback):
    """Logs ``perf/tokens_per_sec``, ``perf/mfu`` and (GPU) ``perf/max_memory_gib`` after each optimizer step.

    FLOPs per token are those of the depths the step actually sampled (``pl_module.last_depths``): a looped
    model's cost changes from step to step, which Lightning's ``ThroughputMonitor`` (one fixed
    ``flops_per_batch``, MFU only for GPUs in its table) does not model. The peak is ``peak_tflops`` when given,
    else the GPU's datasheet figure from Lightning's table, else a measured fp32 matmul rate on CPU.
    Validation time is not counted as training time.
    """

    def __init__(self) -> None:
        self._step_start: Optional[float] = None
        self._peak: Optional[float] = None
        self._peak_known = False
        self._flops_cache: dict[tuple, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._step_start is None:
            self._step_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._step_start = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % trainer.accumulate_grad_batches or self._step_start is None:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self._step_start = now - self._step_start, now
        x = batch[0]
        tokens = x.numel() * trainer.world_size * trainer.accumulate_grad_batches
        pl_module.log("perf/tokens_per_sec", tokens / elapsed, on_step=True)
        peak = self._peak_flops(pl_module, trainer)
        if peak:
            flops = tokens * self._flops_per_token(pl_module, x.shape[1])
            pl_module.log("perf/mfu", flops / elapsed / (peak * trainer.world_size), on_step=True)
        if pl_module.device.type == "cuda":
            pl_module.log("perf/max_memory_gib", torch.cuda.max_memory_allocated() / 2**30, on_step=True)

    def _flops_per_token(self, pl_module, seq_len: int) -> float:
        from parcae.model import flops_per_token

        depths = getattr(pl_module, "last_depths", None) if pl_module.arch.looped else None
        # mean iterations of this micro-batch, rounded so that the cache stays small
        no_grad = round(depths.no_grad.float().mean().item(), 3) if depths is not None else None
        grad = round(depths.grad.float().mean().item(), 3) if depths is not None else None
        key = (no_grad, grad, seq_len)
        if key not in self._flops_cache:
            self._flops_cache[key] = flops_per_token(pl_module.arch, seq_len, no_grad_iterations=no_grad,
                                                     grad_iterations=grad).per_token
        return self._flops_cache[key]

    def _peak_flops(self, pl_module, trainer) -> Optional[float]:
        if not self._peak_known:
            tflops = getattr(pl_module, "peak_tflops", None)
            self._peak = tflops * 1e12 if tflops else device_peak_flops(pl_module.device, trainer.precision)
            self._peak_known = True
        return self._peak


def device_peak_flops(device: torch.device, precision) -> Optional[float]:
    """Peak FLOP/s: the GPU's datasheet figure (Lightning's table; ``None`` for a GPU it does not list) or a
    measured fp32 matmul rate on CPU."""
    if device.type == "cuda":
        from lightning.fabric.utilities.throughput import get_available_flops

        dtype = torch.bfloat16 if "bf16" in str(precision) else torch.float32
        return get_available_flops(device, dtype)
    a = torch.randn(1024, 1024)
    a @ a
    start = time.perf_counter()
    for _ in range(5):
        a @ a
    return 5 * 2 * 1024**3 / (time.perf_counter() - start)
