"""Training FLOPs per token (paper App. D), used for MFU and for isoFLOP token budgets.

    C/D = 2·N̂₁ + 6·N̂₂ + attention
    N̂₁  = (μ_rec − μ_bwd) · N_core           loop iterations run without gradient: forward only (2N)
    N̂₂  = N_other + μ_bwd · N_core           everything backpropagated: forward + backward (6N)
    attention (PaLM / nanochat, 4·d·S per layer forward): 4dS·[3·(P + C) + μ_rec·R + 2·μ_bwd·R]

N_core = parameters applied on every iteration (the recurrent blocks and the injection). Which other
parameters count is a convention, and the two sources disagree (paper App. D; docs/design.md §3):

* ``paper`` (App. D text; default): embeddings excluded, unembedding included. Value-embedding tables are
  embeddings (lookups, no matmul), so they are excluded too. This counts the matmul FLOPs actually run,
  so it is the right one for MFU.
* ``official`` (the official ``scripts/cost.py`` at dee8363): total parameters
  minus the tied embedding, so the unembedding is *not* counted while value-embedding tables are.

For a GPT (no loop) both reduce to 6·N + attention with the same convention for N.

    python -m parcae.model parcae-140m --meta      # parameters by part and FLOPs/token of a preset
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch

from .config import ModelConfig

Convention = Literal["paper", "official"]


@dataclass(frozen=True)
class FlopBreakdown:
    core_params: int          # N_core: per-iteration parameters (recurrent blocks + injection)
    other_params: int         # N_other: counted once per token (prelude, coda, readout, head, ...)
    no_grad_iterations: float
    grad_iterations: float
    attention_forward: float  # attention FLOPs per token, forward only
    attention: float          # attention FLOPs per token, forward + backward
    per_token: float          # total training FLOPs per token

    @property
    def forward_per_token(self) -> float:
        """Inference FLOPs per token at the same depth (every iteration forward only)."""
        iterations = self.no_grad_iterations + self.grad_iterations
        return 2.0 * (self.other_params + iterations * self.core_params) + self.attention_forward


def _param_groups(config: ModelConfig, convention: Convention) -> tuple[int, int]:
    from .looped import LoopedLM  # local import: flops is imported by the model package

    with torch.device("meta"):
        model = LoopedLM(config)
    counts = model.parameter_counts()
    core = counts["recurrent"] + counts["injection"]
    if not config.looped:  # a GPT runs its recurrent-slot blocks once like the rest
        core = 0
    other = counts["total"] - core - counts["embeddings"]
    if convention == "paper":
        # The tied table counts once, as the LM-head matmul; value tables are lookups and drop out.
        other += counts["embeddings"] - counts["value_embeddings"]
    elif convention != "official":
        raise ValueError(f"FLOP convention must be 'paper' or 'official', got {convention!r}")
    return core, other


def flops_per_token(config: ModelConfig, seq_len: Optional[int] = None, *,
                    no_grad_iterations: Optional[float] = None, grad_iterations: Optional[float] = None,
                    convention: Convention = "paper") -> FlopBreakdown:
    """Training FLOPs per token of ``config`` at the given mean loop split (default μ_rec − μ_bwd, μ_bwd).

    Pass the mean of sampled (no-grad, grad) iterations to count what a batch actually ran.
    """
    seq_len = config.block_size if seq_len is None else seq_len
    core, other = _param_groups(config, convention)
    d, P, R, C = config.d_model, config.n_prelude, config.n_recurrent, config.n_coda
    if config.looped:
        if grad_iterations is None:
            grad_iterations = float(min(config.mean_recurrence, config.backprop_depth))
        if no_grad_iterations is None:
            no_grad_iterations = float(config.mean_recurrence - min(config.mean_recurrence, config.backprop_depth))
        iterations = no_grad_iterations + grad_iterations
        attn_fwd_layers = P + C + iterations * R
        attn_train_layers = 3 * (P + C) + iterations * R + 2 * grad_iterations * R
    else:
        no_grad_iterations, grad_iterations = 0.0, 1.0
        attn_fwd_layers = config.n_layers
        attn_train_layers = 3 * config.n_layers
    attention_unit = 4.0 * d * seq_len  # forward attention FLOPs per token per layer (QKᵀ and AV)
    per_token = 2.0 * no_grad_iterations * core + 6.0 * (other + grad_iterations * core) \
        + attention_unit * attn_train_layers
    return FlopBreakdown(core, other, no_grad_iterations, grad_iterations, attention_unit * attn_fwd_layers,
                         attention_unit * attn_train_layers, per_token)


def inference_flops_per_token(config: ModelConfig, iterations: float, readouts: float = 1.0,
                               context: float = 0.0) -> float:
    """Forward FLOPs per generated (or scored) token as the inference engine spends them: the prelude and the
    injection's input term B̄e once, the recurrent blocks and Ā ``iterations`` times, and the read-out path (C, coda, final norm, tied head)
    ``readouts`` times -- once per token at a fixed depth or with a state-based exit rule, once per checked
    iteration with an output-based rule (kl, entropy-diff, ...). Matmuls count 2 FLOPs per multiplied parameter
    (value-embedding lookups count nothing); attention adds 4·d·``context`` per attention layer, ``context`` being
    the mean number of positions a token attends to."""
    from .looped import LoopedLM  # local import: flops is imported by the model package

    with torch.device("meta"):
        counts = LoopedLM(config).parameter_counts()
    head = counts["embeddings"]  # the tied table, used once per read-out as the head (value tables are lookups)
    # B̄e (diagonal: B; concat: the e half of its projection) is computed once per token, before the loop; each
    # iteration applies only Ā (or concat's h half) to the state
    input_term = 0 if config.injection in ("add", "none") else config.d_model ** 2
    once = counts["prelude"] + counts["norms"] + input_term
    per_iteration = counts["recurrent"] + counts["injection"] - input_term
    per_readout = counts["readout"] + counts["coda"] + head
    if not config.looped:  # a GPT runs its middle blocks once like the rest
        once, per_iteration, iterations = once + per_iteration, 0, 0.0
        attention_layers = config.n_layers - config.n_coda + readouts * config.n_coda
    else:
        attention_layers = config.n_prelude + iterations * config.n_recurrent + readouts * config.n_coda
    return 2.0 * (once + iterations * per_iteration + readouts * per_readout) \
        + 4.0 * config.d_model * context * attention_layers


def effective_parameters(config: ModelConfig, mean_recurrence: Optional[float] = None) -> float:
    """N(μ_rec), the unrolled parameter count of the scaling laws (paper Eq. 4/7): non-embedding parameters
    with the per-iteration ones (recurrent blocks + injection) counted μ_rec times. The paper does not state
    its exact counting (docs/design.md §6); this is the matmul-parameter count of the "paper" FLOP convention."""
    core, other = _param_groups(config, "paper")
    mu = config.mean_recurrence if mean_recurrence is None else mean_recurrence
    return float(other + (mu if config.looped else 0) * core)


def tokens_for_budget(config: ModelConfig, flops: float, seq_len: Optional[int] = None,
                      convention: Convention = "paper") -> int:
    """Training tokens D for a FLOP budget C: D = C / (FLOPs per token) (paper §5.2 isoFLOP sweeps)."""
    return int(flops / flops_per_token(config, seq_len, convention=convention).per_token)

