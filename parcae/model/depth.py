"""Training-time depth sampling and truncated backprop splits (paper §2 "Depth sampling", App. G-H).

Every sequence i runs T_i = n_i + k_i loop iterations: first n_i without gradient, then the last k_i
with gradient (truncated BPTT). Samplers:

* ``poisson_truncated`` (paper Alg. 4, the "corrected" sampler used for every main-body model):
  T ~ Poisson(μ_rec), T ≥ 1; k = min(T, μ_bwd); n = T − k.
* ``poisson_lognormal`` (Geiping et al., as the paper writes it in Alg. 3 / Eq. 5): τ ~ 𝒩(ln(μ_rec − μ_bwd) − σ²/2, σ),
  σ = ½; n ~ Poisson(e^τ) + 1; k = μ_bwd. Needs μ_rec > μ_bwd.
* ``huginn`` (Huginn's code, seal-rg/recurrent-pretraining, and what the paper's early RDM runs of Tables 9-10
  used): rate ~ LogNormal(ln μ_rec − σ²/2, σ); T = Poisson(rate) + 1; k = min(μ_bwd, T); n = T − k. Defined
  for any μ_rec (Table 9 has μ_rec = μ_bwd = 4, where Alg. 3 is not).
* ``fixed``: T = μ_rec for every sequence.

Granularity: ``per_sequence`` draws one T per sequence (the paper's choice, App. G); ``per_batch`` one T
per micro-batch. Randomness comes only from a CPU generator seeded by the step (never from the global
RNG), so a resumed run samples the same depths. The draw covers the *global* batch (all ranks) and rank r
takes rows r, r + R, r + 2R, ... (the layout of DistributedSampler): DDP over R ranks samples exactly what
one process sees on the same global batch. The seed 514229 + step is the official one at rank 0
(``_sample_batch_depths`` in parcae_lm/models/parcae/parcae.py).

Evaluation never samples: the model runs exactly the requested number of loops.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

try:  # in an exported Hugging Face folder these two files travel beside this one (parcae.interop.hf_folder)
    from .errors import UsageError
    from .validation import check_choices
except ImportError:  # inside the parcae package: the ground layer's
    from parcae.errors import UsageError
    from parcae.validation import check_choices

from .config import DepthGranularity, DepthScheme, ModelConfig

_SEED_OFFSET = 514229       # official per-sequence sampler seed offset (a Fibonacci prime)
_SEED_MODULUS = 2**31 - 1
LOGNORMAL_SIGMA = 0.5       # paper Eq. 5


@dataclass
class Depths:
    """Per-sequence loop counts: ``no_grad[i]`` iterations without gradient, then ``grad[i]`` with it."""

    no_grad: Tensor  # int64 [B], CPU
    grad: Tensor     # int64 [B], CPU

    def __post_init__(self) -> None:
        self.no_grad = torch.as_tensor(self.no_grad, dtype=torch.long).cpu().reshape(-1)
        self.grad = torch.as_tensor(self.grad, dtype=torch.long).cpu().reshape(-1)
        if self.no_grad.shape != self.grad.shape:
            raise ValueError(f"Depths: no_grad {tuple(self.no_grad.shape)} and grad {tuple(self.grad.shape)} "
                             "must have one entry per sequence")
        if (self.no_grad < 0).any() or (self.grad < 0).any() or (self.total < 1).any():
            raise ValueError("Depths: every sequence needs no_grad >= 0, grad >= 0 and at least one iteration")

    @property
    def total(self) -> Tensor:
        return self.no_grad + self.grad

    def __len__(self) -> int:
        return self.grad.numel()

    @classmethod
    def split(cls, loops: int | Tensor, backprop_depth: int, batch_size: int | None = None) -> "Depths":
        """T loops with only the last min(T, μ_bwd) backpropagated (paper Alg. 4's split)."""
        total = torch.as_tensor(loops, dtype=torch.long).reshape(-1)
        if batch_size is not None and total.numel() == 1:
            total = total.expand(batch_size)
        if (total < 1).any():
            raise ValueError(f"loops must be >= 1, got {total.min().item()}")
        grad = total.clamp(max=backprop_depth)
        return cls(no_grad=total - grad, grad=grad)


@dataclass
class DepthSampler:
    """Seeded training-depth sampler. ``sampler(step, batch_size, rank, world_size) -> Depths``."""

    scheme: DepthScheme = "poisson_truncated"
    mean_recurrence: int = 8
    backprop_depth: int = 4
    granularity: DepthGranularity = "per_sequence"
    seed_offset: int = _SEED_OFFSET

    @classmethod
    def from_config(cls, config: ModelConfig) -> "DepthSampler":
        return cls(config.depth_scheme, config.mean_recurrence, config.backprop_depth, config.depth_granularity)

    def __post_init__(self) -> None:
        check_choices(self)
        if self.mean_recurrence < 1:
            raise ValueError(f"DepthSampler.mean_recurrence must be >= 1, got {self.mean_recurrence}")
        if self.backprop_depth < 1:
            raise ValueError(f"DepthSampler.backprop_depth must be >= 1, got {self.backprop_depth}")
        if self.scheme == "poisson_lognormal" and self.mean_recurrence <= self.backprop_depth:
            raise ValueError("DepthSampler: poisson_lognormal needs mean_recurrence > backprop_depth")

    def generator(self, step: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed_offset + int(step)) % _SEED_MODULUS)

    def __call__(self, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Depths:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        draws = batch_size * world_size if self.granularity == "per_sequence" else 1
        no_grad, grad = self._draw(draws, self.generator(step))
        if self.granularity == "per_batch":  # one depth for the whole (global) micro-batch
            return Depths(no_grad.expand(batch_size), grad.expand(batch_size))
        # Row i of rank r is global sequence i·world_size + r: DistributedSampler's interleaved layout.
        rows = slice(rank, batch_size * world_size, world_size)
        return Depths(no_grad[rows], grad[rows])

    def _draw(self, n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
        mu, bwd = self.mean_recurrence, self.backprop_depth
        if self.scheme == "fixed":
            total = torch.full((n,), mu, dtype=torch.long)
        elif self.scheme == "poisson_truncated":
            total = torch.poisson(torch.full((n,), float(mu)), generator=g).long().clamp(min=1)
        elif self.scheme == "huginn":
            rate = torch.exp(torch.randn(n, generator=g) * LOGNORMAL_SIGMA + (math.log(mu) - LOGNORMAL_SIGMA**2 / 2))
            total = torch.poisson(rate, generator=g).long() + 1
        else:  # poisson_lognormal: n ~ Poisson(exp(τ)) + 1 no-grad steps, then exactly μ_bwd grad steps
            tau = torch.randn(n, generator=g) * LOGNORMAL_SIGMA + (math.log(mu - bwd) - LOGNORMAL_SIGMA**2 / 2)
            no_grad = torch.poisson(torch.exp(tau), generator=g).long() + 1
            return no_grad, torch.full((n,), bwd, dtype=torch.long)
        grad = total.clamp(max=bwd)
        return total - grad, grad

    def expected_iterations(self, samples: int = 200_000) -> tuple[float, float]:
        """Mean (no-grad, grad) iterations per sequence, estimated from the sampler itself."""
        no_grad, grad = self._draw(samples, self.generator(0))
        return no_grad.double().mean().item(), grad.double().mean().item()


def parse_loops(spec: str | int | list[int] | None) -> list[int] | None:
    """"4,8,16" / "1-4,8" / 8 / [4, 8] -> sorted unique loop counts; a one-line UsageError otherwise."""
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
            raise UsageError(f"--loops: {item!r} is not an integer or a range like 1-16") from None
        if len(values) == 2:
            if values[0] > values[1]:
                raise UsageError(f"--loops: range {item!r} is empty")
            values = list(range(values[0], values[1] + 1))
        if min(values) < 1:
            raise UsageError(f"--loops: loop counts must be >= 1, got {item!r}")
        loops.update(values)
    if not loops:
        raise UsageError("--loops: no loop counts given")
    return sorted(loops)
