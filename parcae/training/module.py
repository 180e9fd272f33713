"""One LightningModule for every model family (Parcae, RDM, GPT): training, validation at several loop
counts, test-time loop sweeps and generation.

Training step: per-sequence depths from the seeded :class:`~parcae.model.DepthSampler` (seeded by the
micro-step, so a resumed run draws the same depths) and like-init noise seeded per sequence; loss, perplexity,
loop telemetry. A step whose gradient is not finite is skipped (gradients dropped, counted); after
``max_nonfinite_losses`` consecutive non-finite losses training stops with :class:`NonFiniteLossError`.
Metric tags are defined here, namespaced: ``train/``, ``val/``, ``test/``, ``loop/``, ``perf/``.

    parcae fit --config recipes/mini/debug.yaml      # see parcae/cli.py
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from torchmetrics import SumMetric

from parcae.model import DepthSampler, LoopedLM, ModelConfig, flops_per_token

from .optim import (LRSchedule, OptimizerConfig, ScheduleConfig, build_optimizer, update_muon_schedules)

LN2 = math.log(2.0)
_STATE_SEED_BASE = 1_000_003  # like-init noise seed = base · (micro_step + 1) + global sequence index


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss stayed NaN/inf; the message says where and what."""


def _as(cls, value):
    """Accept a dataclass or a dict of its fields (checkpoints store plain dicts)."""
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls(**value)


def parse_loops(spec: str | int | list[int] | None) -> Optional[list[int]]:
    """"4,8,16" / "1-4,8" / 8 / [4, 8] -> sorted unique loop counts; one-line ValueError otherwise."""
    if spec is None:
        return None
    if isinstance(spec, int) and not isinstance(spec, bool):
        items = [str(spec)]
    elif isinstance(spec, (list, tuple)):
        items = [str(s) for s in spec]
    else:
        items = [s.strip() for s in str(spec).split(",") if s.strip()]
    loops: set[int] = set()
    for item in items:
        bounds = item.split("-") if "-" in item[1:] else [item]
        try:
            values = [int(b) for b in bounds]
        except ValueError:
            raise ValueError(f"--loops: {item!r} is not an integer or a range like 1-16") from None
        if len(values) == 2:
            if values[0] > values[1]:
                raise ValueError(f"--loops: range {item!r} is empty")
            values = list(range(values[0], values[1] + 1))
        if min(values) < 1:
            raise ValueError(f"--loops: loop counts must be >= 1, got {item!r}")
        loops.update(values)
    if not loops:
        raise ValueError("--loops: no loop counts given")
    return sorted(loops)


class LoopedLMModule(L.LightningModule):
    def __init__(self, arch: ModelConfig = ModelConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
                 schedule: ScheduleConfig = ScheduleConfig(), eval_loops: list[int] = [1, 2, 4, 8],
                 telemetry_every: int = 10, max_nonfinite_losses: int = 10, compile: bool = False,
                 activation_checkpointing: bool = False, peak_tflops: Optional[float] = None) -> None:
        """
        Args:
            arch: The model (see ``parcae.model.ModelConfig``; presets in ``configs/model/``).
            optimizer: ``adamw`` or ``muon_adamw`` and their settings.
            schedule: Learning-rate schedule over ``trainer.max_steps``.
            eval_loops: Loop counts validated besides μ_rec (official runs: 1, 2, 4, 8).
            telemetry_every: Log loop telemetry (ρ(Ā), state norms, residual, depth histogram) every N steps.
            max_nonfinite_losses: Stop after this many consecutive non-finite training losses.
            compile: ``torch.compile`` each block (GPU; the loop itself stays eager).
            activation_checkpointing: Recompute each backpropagated loop iteration during backward instead of
                storing its activations (the official 1.3B setting).
            peak_tflops: Peak device TFLOP/s for MFU; default: the GPU's bf16/fp32 peak, or a measured fp32
                matmul rate on CPU.
        """
        super().__init__()
        self.arch, self.optim_config = _as(ModelConfig, arch), _as(OptimizerConfig, optimizer)
        self.schedule_config = _as(ScheduleConfig, schedule)
        if telemetry_every < 1 or max_nonfinite_losses < 1:
            raise ValueError("telemetry_every and max_nonfinite_losses must be >= 1")
        self.eval_loops = parse_loops(list(eval_loops)) if self.arch.looped else [1]
        self.telemetry_every, self.max_nonfinite_losses = telemetry_every, max_nonfinite_losses
        self.compile_blocks, self.peak_tflops = compile, peak_tflops
        self.save_hyperparameters({"arch": dataclasses.asdict(self.arch),
                                   "optimizer": dataclasses.asdict(self.optim_config),
                                   "schedule": dataclasses.asdict(self.schedule_config),
                                   "eval_loops": list(eval_loops), "telemetry_every": telemetry_every,
                                   "max_nonfinite_losses": max_nonfinite_losses, "compile": compile,
                                   "activation_checkpointing": activation_checkpointing,
                                   "peak_tflops": peak_tflops})
        self.net = LoopedLM(self.arch)
        self.net.checkpoint_iterations = activation_checkpointing
        self.sampler = DepthSampler.from_config(self.arch) if self.arch.looped else None
        self.micro_step = 0           # training forwards so far (seeds depths and state noise)
        self.skipped_steps = 0        # optimizer steps dropped for non-finite gradients
        self.nonfinite_streak = 0
        self.test_loops: Optional[list[int]] = None
        self.byte_lengths: Optional[torch.Tensor] = None
        self.generation: dict[str, Any] = {}
        self._step_start: Optional[float] = None
        self._flops_cache: dict[tuple[float, float, int], float] = {}

    # -- setup ------------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "check_vocabulary"):
            dm.check_vocabulary(self.arch.vocab_size, self.arch.name)
            from parcae.data import load_tokenizer, token_byte_lengths

            lengths = token_byte_lengths(load_tokenizer(str(dm.tokenizer_path)))
            padded = torch.zeros(self.arch.padded_vocab_size, dtype=torch.long)
            padded[: len(lengths)] = lengths
            self.byte_lengths = padded
        if self.compile_blocks and not getattr(self, "_compiled", False):
            for block in [*self.net.prelude, *self.net.recurrent, *self.net.coda]:
                block.compile(dynamic=None)
            self._compiled = True
        self._make_metrics()

    def _make_metrics(self) -> None:
        loops = sorted(set(self.eval_loops) | set(self.test_loops or []) |
                       ({self.arch.mean_recurrence} if self.arch.looped else {1}))
        self.eval_sums = torch.nn.ModuleDict()
        for t in loops:
            for what in ("nats", "tokens", "bytes", "seconds"):
                self.eval_sums[f"{what}_{t}"] = SumMetric().to(self.device)

    def configure_optimizers(self):
        optimizer = build_optimizer(self.net, self.optim_config)
        total = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else -1
        schedule = LRSchedule(self.schedule_config, total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoint state beyond parameters ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["parcae"] = {"micro_step": self.micro_step, "skipped_steps": self.skipped_steps,
                                "nonfinite_streak": self.nonfinite_streak}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("parcae", {})
        self.micro_step = state.get("micro_step", 0)
        self.skipped_steps = state.get("skipped_steps", 0)
        self.nonfinite_streak = state.get("nonfinite_streak", 0)

    # -- training -------------------------------------------------------------------------------------------
    def _state_seeds(self, batch_size: int) -> list[int]:
        world, rank = self.trainer.world_size, self.global_rank
        base = _STATE_SEED_BASE * (self.micro_step + 1)
        return [(base + i * world + rank) % (2**63 - 1) for i in range(batch_size)]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap Lightning's LightningOptimizer
        update_muon_schedules(optimizer, self.optim_config, self.global_step, self.trainer.max_steps)
        if self._step_start is None:
            self._step_start = time.perf_counter()

    def training_step(self, batch, batch_idx: int):
        x, y = batch
        B, S = x.shape
        telemetry = self.arch.looped and self.global_step % self.telemetry_every == 0
        depths = None
        if self.sampler is not None:
            depths = self.sampler(self.micro_step, B, rank=self.global_rank, world_size=self.trainer.world_size)
        out = self.net(x, y, depths=depths, state_seed=self._state_seeds(B) if self.arch.looped else None,
                       telemetry=telemetry)
        self.micro_step += 1
        loss = out.loss
        mean_loss = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")  # same on every rank
        if not torch.isfinite(mean_loss):
            self.nonfinite_streak += 1
            if self.nonfinite_streak >= self.max_nonfinite_losses:
                raise NonFiniteLossError(
                    f"training stopped at step {self.global_step}: the loss was {mean_loss.item()} for "
                    f"{self.nonfinite_streak} consecutive steps (lr {self._lr():.3g}); lower the learning rate, "
                    "check the data, or resume from an earlier checkpoint")
        else:
            self.nonfinite_streak = 0
        self.log("train/loss", mean_loss, on_step=True, prog_bar=True, batch_size=B)
        self.log("train/ppl", torch.exp(mean_loss.clamp(max=30)), on_step=True, batch_size=B)
        self.log("tokens_seen", float((self.global_step + 1) * B * S * self.trainer.world_size
                                      * self.trainer.accumulate_grad_batches), on_step=True, batch_size=B)
        if depths is not None:
            self._last_depths = (depths.no_grad.float().mean().item(), depths.grad.float().mean().item())
            self.log("loop/mean_depth", depths.total.float().mean(), on_step=True, batch_size=B)
        if out.telemetry is not None:
            self._log_telemetry(out.telemetry, B)
        return loss

    def _log_telemetry(self, t: dict, batch_size: int) -> None:
        for key, tag in (("spectral_radius", "loop/spectral_radius"), ("mean_decay", "loop/mean_decay"),
                         ("final_state_norm", "loop/state_norm"), ("residual", "loop/residual"),
                         ("rel_residual", "loop/rel_residual")):
            self.log(tag, t[key].float(), on_step=True, batch_size=batch_size)
        for i, value in enumerate(t["state_norm"].tolist()):
            self.log(f"loop/state_norm_t{i:02d}", value, on_step=True, batch_size=batch_size)
        experiment = getattr(self.logger, "experiment", None)
        if self.trainer.is_global_zero and hasattr(experiment, "add_histogram"):
            experiment.add_histogram("loop/depth", t["depth"], self.global_step)

    def on_before_optimizer_step(self, optimizer) -> None:
        grads = [p.grad for p in self.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        self.log("grad_norm", norm, on_step=True)
        if not torch.isfinite(norm):
            for p in self.parameters():  # drop the update: optimizers skip parameters without gradient
                p.grad = None
            self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        self.log("lr", self._lr(), on_step=True)
        if len({g.get("kind") for g in optimizer.param_groups}) > 1:
            self.log("lr_muon", next(g["lr"] for g in optimizer.param_groups if g.get("kind") == "muon"), on_step=True)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self._step_start = now - self._step_start, now
        x = batch[0]
        tokens = x.numel() * self.trainer.world_size * self.trainer.accumulate_grad_batches
        self.log("perf/tokens_per_sec", tokens / elapsed, on_step=True)
        flops = tokens * self._flops_per_token(x.shape[1])
        peak = self._peak_flops()
        if peak:
            self.log("perf/mfu", flops / elapsed / (peak * self.trainer.world_size), on_step=True)
        if self.device.type == "cuda":
            self.log("perf/max_memory_gib", torch.cuda.max_memory_allocated() / 2**30, on_step=True)

    def _flops_per_token(self, seq_len: int) -> float:
        no_grad, grad = getattr(self, "_last_depths", (None, None)) if self.arch.looped else (None, None)
        key = (round(no_grad, 3) if no_grad is not None else -1.0, round(grad, 3) if grad is not None else -1.0,
               seq_len)
        if key not in self._flops_cache:
            self._flops_cache[key] = flops_per_token(self.arch, seq_len, no_grad_iterations=no_grad,
                                                     grad_iterations=grad).per_token
        return self._flops_cache[key]

    def _peak_flops(self) -> Optional[float]:
        if self.peak_tflops:
            return self.peak_tflops * 1e12
        if not hasattr(self, "_measured_peak"):
            self._measured_peak = _device_peak_flops(self.device, self.trainer.precision)
        return self._measured_peak

    def _lr(self) -> float:
        if not self.trainer.optimizers:
            return 0.0
        return next(g["lr"] for g in self.trainer.optimizers[0].param_groups if g.get("kind", "adamw") == "adamw")

    # -- evaluation ------------------------------------------------------------------------------------------
    def _evaluate(self, batch, loops: list[int]) -> None:
        x, y = batch
        for t in loops:
            start = time.perf_counter()
            out = self.net(x, loops=t if self.arch.looped else None)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            nats = F.cross_entropy(out.logits.flatten(0, 1), y.flatten(), reduction="sum")
            self.eval_sums[f"nats_{t}"].update(nats)
            self.eval_sums[f"tokens_{t}"].update(float(y.numel()))
            self.eval_sums[f"seconds_{t}"].update(seconds)
            if self.byte_lengths is not None:
                self.eval_sums[f"bytes_{t}"].update(self.byte_lengths.to(y.device)[y].sum().float())

    def _results(self, loops: list[int]) -> list[dict]:
        rows = []
        for t in loops:
            nats, tokens = self.eval_sums[f"nats_{t}"].compute(), self.eval_sums[f"tokens_{t}"].compute()
            nbytes, seconds = self.eval_sums[f"bytes_{t}"].compute(), self.eval_sums[f"seconds_{t}"].compute()
            loss = (nats / tokens).item()
            row = {"loops": t, "loss": loss, "ppl": math.exp(min(loss, 30.0)),
                   "bpb": (nats / (LN2 * nbytes)).item() if self.byte_lengths is not None and nbytes > 0 else None,
                   "tokens_per_sec": (tokens * self.trainer.world_size / seconds).item() if seconds > 0 else None}
            rows.append(row)
        for metric in self.eval_sums.values():
            metric.reset()
        return rows

    @property
    def val_loops(self) -> list[int]:
        return sorted(set(self.eval_loops) | {self.arch.mean_recurrence}) if self.arch.looped else [1]

    def on_validation_end(self) -> None:
        self._step_start = None  # validation time is not training throughput

    def validation_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.val_loops)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            self._results(self.val_loops)
            return
        rows = {r["loops"]: r for r in self._results(self.val_loops)}
        main = rows[self.arch.mean_recurrence if self.arch.looped else 1]
        self.log("val/loss", main["loss"], sync_dist=False)
        self.log("val/ppl", main["ppl"])
        self.log("hp/val_loss", main["loss"])
        if main["bpb"] is not None:
            self.log("val/bpb", main["bpb"])
        if self.arch.looped:
            for t, row in rows.items():
                self.log(f"val/loss_T{t}", row["loss"])

    def test_step(self, batch, batch_idx: int) -> None:
        self._evaluate(batch, self.test_loops or self.val_loops)

    def on_test_epoch_end(self) -> None:
        loops = self.test_loops or self.val_loops
        rows = self._results(loops)
        for row in rows:
            self.log(f"test/loss_T{row['loops']}", row["loss"])
            if row["bpb"] is not None:
                self.log(f"test/bpb_T{row['loops']}", row["bpb"])
        self.test_results = rows
        if self.trainer.is_global_zero:
            _report_test(self, rows)

    # -- generation (parcae predict) -----------------------------------------------------------------------
    def predict_step(self, batch, batch_idx: int) -> list[int]:
        g = self.generation
        ids = batch[0] if isinstance(batch, (list, tuple)) else batch
        if g.get("generate") is not None:  # the KV-cached engine (parcae.inference), handed in by `parcae predict`
            return g["generate"](self.net, ids, g)
        generator = torch.Generator(ids.device).manual_seed(g.get("seed", 0))
        loops = g.get("loops") if self.arch.looped else None
        for _ in range(g.get("max_new_tokens", 100)):
            context = ids[:, -self.arch.block_size:]
            logits = self.net(context, loops=loops).logits[:, -1] / max(g.get("temperature", 1.0), 1e-6)
            if g.get("top_k"):
                kth = torch.topk(logits, min(g["top_k"], logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            logits[:, self.arch.vocab_size:] = float("-inf")  # never sample padding rows
            if g.get("temperature", 1.0) == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(torch.softmax(logits.float(), -1), 1, generator=generator)
            ids = torch.cat([ids, nxt], dim=1)
            if g.get("stop_id") is not None and nxt.item() == g["stop_id"]:
                break
        return ids[0].tolist()


def _device_peak_flops(device: torch.device, precision) -> Optional[float]:
    """Peak FLOP/s: the GPU's datasheet figure (Lightning's table) or a measured fp32 matmul rate on CPU."""
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


def _report_test(module: LoopedLMModule, rows: list[dict]) -> None:
    """Rich table on the console, JSON + CSV + a PNG plot of loss vs loops in the run directory."""
    from rich.console import Console
    from rich.table import Table

    run_dir = Path(module.trainer.log_dir or ".")
    run_dir.mkdir(parents=True, exist_ok=True)
    table = Table(title=f"{module.arch.name}: loss by loop count (μ_rec = {module.arch.mean_recurrence})")
    for col in ("loops", "loss", "ppl", "bpb", "tokens/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["loops"]), f"{r['loss']:.4f}", f"{r['ppl']:.2f}",
                      "-" if r["bpb"] is None else f"{r['bpb']:.4f}",
                      "-" if r["tokens_per_sec"] is None else f"{r['tokens_per_sec']:,.0f}")
    Console().print(table)
    payload = {"model": module.arch.name, "mean_recurrence": module.arch.mean_recurrence,
               "global_step": module.global_step, "results": rows}
    (run_dir / "test_loops.json").write_text(json.dumps(payload, indent=2) + "\n")
    with open(run_dir / "test_loops.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["loops", "loss", "ppl", "bpb", "tokens_per_sec"])
        writer.writeheader()
        writer.writerows(rows)
    fit = None
    if module.arch.looped and len(rows) >= 3:
        from parcae.eval.fits import fit_loops_file

        try:
            fitted = fit_loops_file(run_dir / "test_loops.json", plot=False)["fits"].get("exp", {})
        except Exception as err:  # a failed fit must not lose the measured results
            fitted = {}
            Console().print(f"[yellow]test-time fit failed ({type(err).__name__}: {err}); results are saved[/yellow]")
        if "params" in fitted:
            fit = fitted
            p = fit["params"]
            Console().print(f"test-time fit L(T) = L∞ + Z·exp(−z·T): L∞ = {p['L_inf']:.4f}, Z = {p['Z']:.4g}, "
                            f"z = {p['z']:.4g} (mean Huber {fit['huber']:.2e}; all forms: parcae fit-loops {run_dir})")
    if len(rows) > 1:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5.5, 3.8))
        loops = [r["loops"] for r in rows]
        ax.plot(loops, [r["loss"] for r in rows], "o", label="validation loss")
        if fit is not None:
            import numpy as np

            p, grid = fit["params"], np.linspace(min(loops), max(loops), 200)
            ax.plot(grid, p["L_inf"] + p["Z"] * np.exp(-p["z"] * grid), "-", lw=1,
                    label=f"L∞ + Z·e^(−zT): L∞ = {p['L_inf']:.3f}, z = {p['z']:.2f}")
        if module.arch.looped:
            ax.axvline(module.arch.mean_recurrence, color="grey", ls="--", label=f"μ_rec = {module.arch.mean_recurrence}")
        ax.set_xlabel("loops T at test time")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(f"{module.arch.name}, step {module.global_step}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(run_dir / "test_loops.png", dpi=120)
        plt.close(fig)
    Console().print(f"[bold]results[/bold]: {run_dir / 'test_loops.json'}, {run_dir / 'test_loops.csv'}"
                    + (f", {run_dir / 'test_loops.png'}" if len(rows) > 1 else ""))
