"""Optimizers and learning-rate schedules of the paper (§2, Tables 20-21; official recpre/optim/muon_adamw.py).

* ``adamw``: AdamW on everything; weight decay (if any) only on the 2-D block matrices.
* ``muon_adamw``: Muon on the 2-D matrices of the blocks (attention Q/K/V/O, MLP), AdamW (betas 0.8/0.95,
  eps 1e-10, no decay) on embeddings, value embeddings, norms, the value-embedding gates and the
  injection/readout parameters (A_log, dt_bias, B, C, concat W). Muon momentum warms up 0.85 → 0.95 over
  300 steps and its weight decay falls linearly 0.2 → 0 over training (driven by the LightningModule).

Muon is ``torch.optim.Muon`` (Nesterov momentum, 5 quintic Newton–Schulz steps, lr·√max(1, rows/cols),
decoupled weight decay) with one override of ``step``. Deliberate differences from torch and the official code:

1. Newton–Schulz runs in fp32 on CPU (torch always casts to bf16, ~50x slower on CPUs without bf16 units:
   7.7 s vs 0.14 s per step at d = 256 here); on GPUs it runs in bf16 exactly like torch.
2. ``cautious_weight_decay=True`` (our default, as the official code) decays only where update and
   parameter agree in sign: p ← p − lr·wd·p·[u·p ≥ 0]; ``False`` is torch's p ← p·(1 − lr·wd).
3. The official code uses Polar-Express coefficients and NorMuon's second-moment normalisation; we keep
   torch's quintic coefficients (3.4445, −4.7750, 2.0315) and no variance reduction.
4. The official code skips the first optimizer step (a defect); we do not.

Under sharding (FSDP2, parameters are ``DTensor`` shards) Muon orthogonalises the *whole* matrix: each rank
gathers the full update (``full_tensor``), runs Newton–Schulz on it (the same numbers on every rank) and keeps
its own shard, so a sharded update equals the unsharded one. AdamW is elementwise and needs nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from typing import Iterable, Literal, Optional

import torch
from torch import Tensor, nn

try:  # sharded (FSDP2) parameters are DTensors; absent on builds without torch.distributed
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover
    DTensor = distribute_tensor = None

from parcae.errors import ConfigError
from parcae.validation import check_choices


@dataclass
class OptimizerConfig:
    """Optimizer settings.

    Args:
        name: ``adamw`` or ``muon_adamw``.
        lr: AdamW learning rate (embeddings, norms, injection, and everything under ``adamw``).
        muon_lr: Muon learning rate for the block matrices (``muon_adamw`` only).
        betas: AdamW betas.
        eps: AdamW epsilon.
        weight_decay: AdamW decoupled weight decay, applied to the block matrices only.
        muon_momentum: Muon momentum after warm-up.
        muon_momentum_start: Muon momentum at step 0.
        muon_momentum_warmup_steps: Steps of linear momentum warm-up.
        muon_weight_decay: Muon weight decay at step 0, decayed linearly to 0 at the last step.
        muon_cautious_weight_decay: Decay only where update and weight agree in sign (official).
    """

    name: Literal["adamw", "muon_adamw"] = "adamw"
    lr: float = 1e-3
    muon_lr: float = 8e-3
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.0
    muon_momentum: float = 0.95
    muon_momentum_start: float = 0.85
    muon_momentum_warmup_steps: int = 300
    muon_weight_decay: float = 0.2
    muon_cautious_weight_decay: bool = True

    def __post_init__(self) -> None:
        check_choices(self)
        self.betas = tuple(float(b) for b in self.betas)  # YAML gives a list
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"OptimizerConfig.betas must be two numbers in [0, 1), got {self.betas}")
        for field in ("lr", "muon_lr"):
            if not getattr(self, field) > 0:
                raise ConfigError(f"OptimizerConfig.{field} must be > 0, got {getattr(self, field)}")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule (a multiplier on every group's base learning rate).

    Args:
        name: ``trapezoid`` (constant, then linear cool-down over the last ``cooldown_fraction``: the paper's),
            ``warmup_cooldown`` (RDM setup: ``warmup_steps`` up, constant, ``cooldown_steps`` down),
            ``cosine`` (warm-up, then cosine to ``min_lr_ratio``) or ``constant``.
        warmup_steps: Linear warm-up from 0.
        cooldown_fraction: Share of training spent cooling down (``trapezoid``; paper: 0.5).
        cooldown_steps: Cool-down length (``warmup_cooldown``; RDM setup: 4096).
        min_lr_ratio: Final learning rate as a fraction of the base.
    """

    name: Literal["trapezoid", "warmup_cooldown", "cosine", "constant"] = "trapezoid"
    warmup_steps: int = 0
    cooldown_fraction: float = 0.5
    cooldown_steps: int = 0
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        check_choices(self)
        if not 0.0 <= self.cooldown_fraction <= 1.0:
            raise ConfigError(f"ScheduleConfig.cooldown_fraction must be in [0, 1], got {self.cooldown_fraction}")
        if self.warmup_steps < 0 or self.cooldown_steps < 0:
            raise ConfigError("ScheduleConfig.warmup_steps and cooldown_steps must be >= 0")


class LRSchedule:
    """step -> multiplier, for ``torch.optim.lr_scheduler.LambdaLR`` (picklable, so resume restores it)."""

    def __init__(self, config: ScheduleConfig, total_steps: int) -> None:
        if total_steps < 1 and config.name != "constant":
            raise ConfigError(f"the {config.name!r} schedule needs trainer.max_steps > 0 (got {total_steps})")
        # Plain fields only: LambdaLR checkpoints this object's __dict__ (loadable with weights_only=True).
        self.schedule = dataclasses.asdict(config)
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        c, total = ScheduleConfig(**self.schedule), self.total_steps
        floor = c.min_lr_ratio
        warm = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        if c.name == "constant":
            return warm
        if c.name == "cosine":
            if step < c.warmup_steps:
                return warm
            progress = min(1.0, (step - c.warmup_steps) / max(1, total - c.warmup_steps))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        cooldown = round(c.cooldown_fraction * total) if c.name == "trapezoid" else c.cooldown_steps
        cool = 1.0 if cooldown <= 0 or step < total - cooldown else max(0.0, (total - step) / cooldown)
        # The smaller ramp wins, so a run shorter than warm-up + cool-down has a continuous schedule.
        return min(warm, floor + (1 - floor) * cool)


def split_parameters(model: nn.Module) -> tuple[list[Tensor], list[Tensor]]:
    """(block matrices, everything else): the Muon / AdamW split of paper Table 20.

    The value-embedding gates go to AdamW as in Table 20 (the official code sends them to Muon).
    """
    matrices, rest = [], []
    for name, p in model.named_parameters():
        in_block = name.startswith(("prelude.", "recurrent.", "coda."))
        if in_block and p.ndim == 2 and not name.endswith("ve_gate.weight"):
            matrices.append(p)
        else:
            rest.append(p)
    return matrices, rest


def _newton_schulz(update: Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                   dtype: torch.dtype) -> Tensor:
    """Quintic Newton–Schulz orthogonalisation (the iteration of torch.optim.Muon) in ``dtype``."""
    a, b, c = coefficients
    x = update.to(dtype)
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / x.norm().clamp(min=eps)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if transposed else x


def _evaluate_closure(closure) -> Optional[Tensor]:
    """The loss from an optimizer closure, with gradients on (``step`` itself runs under no_grad)."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Muon):
    """``torch.optim.Muon`` with fp32 orthogonalisation on CPU and optional cautious weight decay."""

    def __init__(self, params: Iterable, *, cautious_weight_decay: bool = False,
                 ns_dtype: Optional[torch.dtype] = None, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.cautious_weight_decay = cautious_weight_decay
        self.ns_dtype = ns_dtype  # None: bf16 on accelerators, fp32 on CPU

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate_closure(closure)
        for group in self.param_groups:
            lr, wd, momentum = float(group["lr"]), group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                dtype = self.ns_dtype or (torch.float32 if p.device.type == "cpu" else torch.bfloat16)
                orthogonalise = partial(_newton_schulz, coefficients=group["ns_coefficients"],
                                        steps=group["ns_steps"], eps=group["eps"], dtype=dtype)
                if DTensor is not None and isinstance(update, DTensor):  # a shard: orthogonalise the whole matrix
                    full = orthogonalise(update.full_tensor())
                    update = distribute_tensor(full, update.device_mesh, update.placements, src_data_rank=None)
                else:
                    update = orthogonalise(update)
                rows, cols = p.shape[:2]
                adjusted_lr = lr * math.sqrt(max(1.0, rows / cols))  # torch's "original" adjustment
                if self.cautious_weight_decay:
                    mask = (update * p >= 0).to(p.dtype)
                    p.sub_(p * mask, alpha=lr * wd)
                else:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-adjusted_lr)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Muon on block matrices and AdamW on the rest, stepped together as one optimizer.

    One optimizer keeps Lightning's automatic optimization (accumulation, clipping, DDP no-sync) and lets one
    LambdaLR scale every group: ``param_groups`` are the two inner optimizers' groups, each tagged ``kind``, and
    the inner optimizers share this optimizer's ``state``, so ``state_dict`` has torch's standard layout (which
    the distributed-checkpoint helpers of sharded training require).
    """

    def __init__(self, matrices: list[Tensor], rest: list[Tensor], config: OptimizerConfig) -> None:
        self.muon = Muon(matrices, lr=config.muon_lr, momentum=config.muon_momentum_start,
                         weight_decay=config.muon_weight_decay, cautious_weight_decay=config.muon_cautious_weight_decay)
        self.adamw = torch.optim.AdamW(rest, lr=config.lr, betas=config.betas, eps=config.eps, weight_decay=0.0)
        super().__init__([{"params": matrices + rest}], {})
        for group in self.muon.param_groups:
            group["kind"] = "muon"
        for group in self.adamw.param_groups:
            group["kind"] = "adamw"
        self.param_groups = self.muon.param_groups + self.adamw.param_groups
        self._share_with_inner()

    def _share_with_inner(self) -> None:
        n_muon = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n_muon], self.param_groups[n_muon:]
        self.muon.state = self.adamw.state = self.state  # disjoint parameters: one table holds both

    @torch.no_grad()
    def step(self, closure=None):
        loss = _evaluate_closure(closure)
        self.muon.step()
        self.adamw.step()
        return loss

    def load_state_dict(self, state_dict):
        if "muon" in state_dict and "adamw" in state_dict:  # layout of checkpoints written before the sharing
            self.muon.load_state_dict(state_dict["muon"])
            self.adamw.load_state_dict(state_dict["adamw"])
            self.param_groups = self.muon.param_groups + self.adamw.param_groups
            self.state = defaultdict(dict, {**self.muon.state, **self.adamw.state})
        else:
            super().load_state_dict(state_dict)
        self._share_with_inner()


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    matrices, rest = split_parameters(model)
    if config.name == "muon_adamw":
        return MuonAdamW(matrices, rest, config)
    groups = [{"params": matrices, "weight_decay": config.weight_decay, "kind": "adamw"},
              {"params": rest, "weight_decay": 0.0, "kind": "adamw"}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, betas=config.betas, eps=config.eps)


def update_muon_schedules(optimizer: torch.optim.Optimizer, config: OptimizerConfig, step: int,
                          total_steps: int) -> None:
    """Muon momentum warm-up (0.85 → 0.95 over 300 steps) and weight decay 0.2 → 0 (paper Table 21)."""
    if not isinstance(optimizer, MuonAdamW):
        return
    warm = min(1.0, step / config.muon_momentum_warmup_steps) if config.muon_momentum_warmup_steps else 1.0
    momentum = config.muon_momentum_start + warm * (config.muon_momentum - config.muon_momentum_start)
    decay = config.muon_weight_decay * max(0.0, 1 - step / total_steps) if total_steps > 0 else config.muon_weight_decay
    for group in optimizer.muon.param_groups:
        group["momentum"] = momentum
        group["weight_decay"] = decay
