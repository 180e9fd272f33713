"""One LightningModule for every model family (Parcae, RDM, GPT): training, validation at several loop
counts, test-time loop sweeps and generation.

Evaluation and generation are calls: the loop counts of a test sweep are the ``test_loops`` argument (``parcae test
--loops`` fills it), ``Trainer.test`` returns the logged per-loop metrics (:func:`loop_rows` turns them back into
rows), and ``predict_step`` decodes a :class:`GenerationRequest` with the inference engine
(:class:`parcae.inference.Engine`). Every loss the module reports for evaluation is
:func:`parcae.model.loss.token_nll` (padded vocabulary excluded), the same number ``parcae perplexity`` reports.

Training step: per-sequence depths from the seeded :class:`~parcae.model.DepthSampler` (seeded by the
micro-step, so a resumed run draws the same depths) and like-init noise seeded per sequence; loss, perplexity,
loop telemetry. A step whose gradient is not finite is skipped (gradients dropped, counted); after
``max_nonfinite_losses`` consecutive non-finite losses training stops with :class:`NonFiniteLossError`.
Metric tags are defined here, namespaced: ``train/``, ``val/``, ``test/``, ``loop/``, ``perf/``.

    parcae fit --config recipes/mini/debug.yaml      # see parcae/cli.py
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Optional

import lightning as L
import torch
from torchmetrics import SumMetric

from parcae.errors import ConfigError, UsageError
from parcae.inference import Sampling
from parcae.inference.options import DepthOptions
from parcae.model import DepthSampler, LoopedLM, ModelConfig, parse_loops
from parcae.model.loss import token_nll
from parcae.runs import PARCAE_KEY, parcae_state, read_parcae_state

from .optim import (LRSchedule, OptimizerConfig, ScheduleConfig, build_optimizer, update_muon_schedules)

LN2 = math.log(2.0)
_STATE_SEED_BASE = 1_000_003  # like-init noise seed = base · (micro_step + 1) + global sequence index


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(30) so an untrained model's report stays a number."""
    return math.exp(min(loss, 30.0))


class NonFiniteLossError(RuntimeError):
    """Training stopped because the loss stayed NaN/inf; the message says where and what."""


def _as(cls, value):
    """Accept a dataclass or a dict of its fields (checkpoints store plain dicts)."""
    if value is None:
        return cls()
    return value if isinstance(value, cls) else cls(**value)


class LoopedLMModule(L.LightningModule):
    def __init__(self, arch: ModelConfig = ModelConfig(), optimizer: OptimizerConfig = OptimizerConfig(),
                 schedule: ScheduleConfig = ScheduleConfig(), eval_loops: list[int] = [1, 2, 4, 8],
                 telemetry_every: int = 10, max_nonfinite_losses: int = 10, compile: bool = False,
                 activation_checkpointing: bool = False, peak_tflops: Optional[float] = None,
                 test_loops: Optional[str | list[int]] = None) -> None:
        """
        Args:
            arch: The model (see ``parcae.model.ModelConfig``): a preset name (``parcae-140m``), a preset with
                overrides (``{preset: parcae-140m, mean_recurrence: 4}``) or every field.
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
            test_loops: Loop counts of a test sweep ("4,8,16", "1-16" or a list; default: μ_rec and the eval
                loops). ``parcae test --loops`` sets it; a setting of the evaluation, not of the trained model, so
                it is not saved with the checkpoint's hyperparameters.
        """
        super().__init__()
        self.arch, self.optim_config = _as(ModelConfig, arch), _as(OptimizerConfig, optimizer)
        self.schedule_config = _as(ScheduleConfig, schedule)
        if telemetry_every < 1 or max_nonfinite_losses < 1:
            raise ConfigError("model.telemetry_every and model.max_nonfinite_losses must be >= 1")
        self.eval_loops = parse_loops(list(eval_loops)) if self.arch.looped else [1]
        self.test_loops = parse_loops(test_loops)
        if self.test_loops is not None and not self.arch.looped and self.test_loops != [1]:
            raise UsageError(f"--loops {test_loops}: {self.arch.name} is a fixed-depth model (injection='none'); "
                             "it has no loops to vary")
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
        # Token ids are validated where data enters (the data module checks the shards' tokenizer against the
        # model's vocabulary), not in every forward: that check is a host sync on every micro-step.
        self.net.check_token_ids = False
        self.net.checkpoint_iterations = activation_checkpointing
        self.sampler = DepthSampler.from_config(self.arch) if self.arch.looped else None
        self.micro_step = 0           # training forwards so far (seeds depths and state noise)
        self.skipped_steps = 0        # optimizer steps dropped for non-finite gradients
        self.nonfinite_streak = 0
        self.checkpoint_step: Optional[int] = None
        self.byte_lengths: Optional[torch.Tensor] = None

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

    def configure_model(self) -> None:
        """Under a sharding strategy (``parcae.training.sharding.FullyShardedStrategy``): shard the blocks."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        trainer = self._trainer
        if trainer is None or not isinstance(trainer.strategy, ModelParallelStrategy) or getattr(self, "_sharded", False):
            return
        from .sharding import shard_model

        shard_model(self.net, trainer.strategy)
        self._sharded = True

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
    # The format is parcae.runs' (one writer for trained and imported runs): Lightning's keys plus parcae_state.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[PARCAE_KEY] = parcae_state(self.micro_step, self.skipped_steps, self.nonfinite_streak,
                                              self.trainer.world_size)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.checkpoint_step = checkpoint.get("global_step")  # test/validate report the step they evaluate
        state = read_parcae_state(checkpoint)
        self.micro_step = state["micro_step"]
        self.skipped_steps = state["skipped_steps"]
        self.nonfinite_streak = state["nonfinite_streak"]
        trainer = self._trainer
        if trainer is not None and trainer.state.fn == "fit" and hasattr(trainer.datamodule, "relocate"):
            # the saved data position names its shards by path: point it at where the same shards live now
            trainer.datamodule.relocate(checkpoint, trainer.ckpt_path)

    # -- training -------------------------------------------------------------------------------------------
    def _state_seeds(self, batch_size: int) -> list[int]:
        world, rank = self.trainer.world_size, self.global_rank
        base = _STATE_SEED_BASE * (self.micro_step + 1)
        return [(base + i * world + rank) % (2**63 - 1) for i in range(batch_size)]

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        optimizer = self.optimizers()
        optimizer = getattr(optimizer, "optimizer", optimizer)  # unwrap Lightning's LightningOptimizer
        update_muon_schedules(optimizer, self.optim_config, self.global_step, self.trainer.max_steps)

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
            self.last_depths = depths  # read by the throughput callback (FLOPs at the sampled depth)
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
        if hasattr(norm, "full_tensor"):  # sharded gradients (DTensor): the norm of the whole model
            norm = norm.full_tensor()
        self.log("grad_norm", norm, on_step=True)
        if not torch.isfinite(norm):
            for p in self.parameters():  # drop the update: optimizers skip parameters without gradient
                p.grad = None
            self.skipped_steps += 1
        self.log("train/skipped_steps", float(self.skipped_steps), on_step=True)
        self.log("lr", self._lr(), on_step=True)
        if len({g.get("kind") for g in optimizer.param_groups}) > 1:
            self.log("lr_muon", next(g["lr"] for g in optimizer.param_groups if g.get("kind") == "muon"), on_step=True)

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
            nats = token_nll(out.logits, y, self.arch.vocab_size, reduction="sum")
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
            row = {"loops": t, "loss": loss, "ppl": perplexity(loss),
                   "bpb": (nats / (LN2 * nbytes)).item() if self.byte_lengths is not None and nbytes > 0 else None,
                   "tokens_per_sec": (tokens * self.trainer.world_size / seconds).item() if seconds > 0 else None}
            rows.append(row)
        for metric in self.eval_sums.values():
            metric.reset()
        return rows

    @property
    def val_loops(self) -> list[int]:
        return sorted(set(self.eval_loops) | {self.arch.mean_recurrence}) if self.arch.looped else [1]

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
        rows = self._results(self.test_loops or self.val_loops)
        # Tags say which split was evaluated: test/ for a held-out test split, test_on_val/ when the shard
        # folder has none and `parcae test` falls back to the validation split. Trainer.test returns them all
        # (loop_rows reads them back into rows).
        split = getattr(getattr(self.trainer, "datamodule", None), "test_split", "val")
        prefix = "test" if split == "test" else "test_on_val"
        for row in rows:
            self.log(f"{prefix}/loss_T{row['loops']}", row["loss"])
            if row["bpb"] is not None:
                self.log(f"{prefix}/bpb_T{row['loops']}", row["bpb"])
            if row["tokens_per_sec"] is not None:
                self.log(f"{prefix}/tokens_per_sec_T{row['loops']}", row["tokens_per_sec"])

    # -- generation (parcae predict) -----------------------------------------------------------------------
    def predict_step(self, request: "GenerationRequest", batch_idx: int) -> list[int]:
        """The prompt's ids followed by the generated ones, decoded by the KV-cached engine (as ``parcae
        generate`` decodes)."""
        engine = DepthOptions(**request.depth).engine(self.net, seed=request.sampling.seed)
        out = engine.generate([request.prompt], request.max_new_tokens, request.sampling, request.stop_ids)[0]
        return list(request.prompt) + out.tokens


@dataclasses.dataclass
class GenerationRequest:
    """One prompt to continue (``predict_step``'s batch): its token ids (BOS first) and how to decode it."""
    prompt: list[int]
    max_new_tokens: int
    sampling: Sampling
    stop_ids: list[int]
    # loops per token (default: μ_rec): DepthOptions' fields, kept as a dict because Lightning's batch transfer
    # rebuilds the dataclasses it carries and DepthOptions is frozen
    depth: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.depth, DepthOptions):
            self.depth = self.depth.as_kwargs()


_LOOP_TAG = re.compile(r"^(test|test_on_val)/(loss|bpb|tokens_per_sec)_T(\d+)$")


def loop_rows(metrics: dict) -> list[dict]:
    """The per-loop rows of a test sweep (loops, loss, ppl, bpb, tokens_per_sec) from the metrics
    ``Trainer.test`` returns (the tags ``on_test_epoch_end`` logs), by loop count."""
    rows: dict[int, dict] = {}
    for tag, value in metrics.items():
        match = _LOOP_TAG.match(tag)
        if match:
            rows.setdefault(int(match[3]), {"loops": int(match[3]), "loss": None, "ppl": None, "bpb": None,
                                            "tokens_per_sec": None})[match[2]] = float(value)
    for row in rows.values():
        row["ppl"] = perplexity(row["loss"])
    return [rows[t] for t in sorted(rows)]
