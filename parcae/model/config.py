"""Typed model configuration and the paper's twelve model presets.

One dataclass describes every model family of the paper:

* **Parcae** (Transformer/nanochat setup, paper Tables 18-19): pre-norm blocks with ReLU², QK-norm and
  value embeddings, ``injection="diagonal"``, readout ``C`` and prelude norm.
* **RDM / Huginn** (paper Table 17): residual ("sandwich") norm blocks with SwiGLU and
  ``injection="concat"``.
* **GPT**: the same blocks run once, ``injection="none"`` (no recurrent state, no loop).

    >>> from parcae.model import preset
    >>> preset("parcae-140m").mean_recurrence
    8
    >>> preset("parcae-140m", d_model=64, n_heads=4, d_ff=256, vocab_size=256).d_model
    64
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal, Optional, get_args

try:  # in an exported Hugging Face folder these two files travel beside this one (parcae.interop.hf_folder)
    from .errors import ConfigError
    from .validation import check_choices
except ImportError:  # inside the parcae package: the ground layer's
    from parcae.errors import ConfigError
    from parcae.validation import check_choices

Injection = Literal["none", "add", "concat", "diagonal", "diagonal_zoh"]
DepthScheme = Literal["poisson_truncated", "poisson_lognormal", "huginn", "fixed"]
DepthGranularity = Literal["per_sequence", "per_batch"]

INJECTIONS = get_args(Injection)
VALUE_GATE_CHANNELS = 32  # the value-embedding gate reads the first 32 normed channels (parcae_lm/modules/mixer.py)


def has_value_embedding(layer: int, n_layers: int) -> bool:
    """The value-embedding placement rule (official parcae_lm at dee8363): the last of ``n_layers`` layers and
    every other one before it, ``layer % 2 == (n_layers - 1) % 2``."""
    return layer % 2 == (n_layers - 1) % 2


@dataclass
class ModelConfig:
    """Architecture and looping of a (looped) language model.

    Args:
        name: Free-form label, used in summaries and run names.
        vocab_size: Tokenizer vocabulary; the embedding is padded up to a multiple of ``padding_multiple``.
        padding_multiple: Vocabulary padding (64 in the paper, for matmul efficiency).
        block_size: Context length the rotary table is built for; longer inputs extend the table.
        d_model: Width of the residual stream (and of the recurrent state h).
        n_heads: Attention query heads; ``d_model`` must be divisible by it.
        n_kv_heads: Key/value heads (grouped-query attention); ``None`` means ``n_heads``.
        d_ff: Hidden width of the MLP.
        n_prelude: Blocks run once before the loop (paper's prelude P).
        n_recurrent: Blocks looped T times (paper's recurrent block R).
        n_coda: Blocks run once after the loop (paper's coda C).
        block: ``prenorm`` (x + f(norm(x)), nanochat and Parcae) or ``sandwich`` (norm(f(norm(x)) + x),
            the Huginn RDM's residual norm, paper App. P.1).
        mlp: ``relu2`` (0.5·relu(x)², nanochat) or ``swiglu`` (Huginn setup).
        qk_norm: Parameter-free RMS norm of queries and keys after RoPE (nanochat setup).
        value_embeddings: Gated value embeddings on alternating layers (nanochat setup).
        rope_base: RoPE base θ (50,000 in both of the paper's setups).
        norm_eps: RMSNorm epsilon.
        injection: How the prelude output e enters the loop: ``diagonal`` (Parcae, h ← Āh + B̄e with
            Ā = exp(−Δ·exp(A_log)), B̄ = Δ·B), ``diagonal_zoh`` (exact zero-order hold input gain),
            ``concat`` (RDM: W[h; e]), ``add`` (h + e), or ``none`` (fixed-depth GPT, no loop).
        readout: Apply the readout matrix C (d→d) to the final state before the coda.
        prelude_norm: RMSNorm on the prelude output e before it is injected (paper App. J).
        state_init: Initial state h₀: ``like-init`` (truncated normal with the embedding std
            √(2/(5d)), fresh noise each forward) or ``zero``.
        mean_recurrence: μ_rec, the mean number of loop iterations in training and the default
            number at evaluation.
        backprop_depth: μ_bwd, the last iterations that are backpropagated through (truncated BPTT).
        depth_scheme: Training depth sampler: ``poisson_truncated`` (paper Alg. 4, T ~ Poisson(μ_rec),
            T ≥ 1), ``poisson_lognormal`` (Geiping et al. as in paper Alg. 3), ``huginn`` (Huginn's code,
            the paper's early RDM runs) or ``fixed``.
        depth_granularity: One depth per sequence (paper's choice, App. G) or per micro-batch.
        init: ``scaled-zero`` (official Parcae/nanochat: orthogonal, zero output projections) or
            ``scaled`` (Takase, Huginn setup).
    """

    name: str = "custom"
    vocab_size: int = 32768
    padding_multiple: int = 64
    block_size: int = 2048
    d_model: int = 768
    n_heads: int = 6
    n_kv_heads: Optional[int] = None
    d_ff: int = 3072
    n_prelude: int = 2
    n_recurrent: int = 2
    n_coda: int = 2
    block: Literal["prenorm", "sandwich"] = "prenorm"
    mlp: Literal["relu2", "swiglu"] = "relu2"
    qk_norm: bool = True
    value_embeddings: bool = True
    rope_base: float = 50000.0
    norm_eps: float = 1e-5
    injection: Injection = "diagonal"
    readout: bool = True
    prelude_norm: bool = True
    state_init: Literal["like-init", "zero"] = "like-init"
    mean_recurrence: int = 8
    backprop_depth: int = 4
    depth_scheme: DepthScheme = "poisson_truncated"
    depth_granularity: DepthGranularity = "per_sequence"
    init: Literal["scaled-zero", "scaled"] = "scaled-zero"

    def __post_init__(self) -> None:
        check_choices(self)  # every Literal field: one error naming the field and its allowed values
        for field in ("vocab_size", "padding_multiple", "block_size", "d_model", "n_heads", "d_ff",
                      "mean_recurrence", "backprop_depth"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"ModelConfig.{field} must be an integer >= 1, got {value!r}")
        for field in ("n_prelude", "n_recurrent", "n_coda"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"ModelConfig.{field} must be an integer >= 0, got {value!r}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"ModelConfig.d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_kv_heads is not None and (self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads):
            raise ConfigError(
                f"ModelConfig.n_kv_heads ({self.n_kv_heads}) must be >= 1 and divide n_heads ({self.n_heads})")
        if self.value_embeddings and self.d_model < VALUE_GATE_CHANNELS:
            raise ConfigError(f"ModelConfig.d_model must be >= {VALUE_GATE_CHANNELS} with value_embeddings "
                             f"(the gate reads the first {VALUE_GATE_CHANNELS} channels), got {self.d_model}")
        if self.n_layers < 1:
            raise ConfigError("ModelConfig needs at least one block (n_prelude + n_recurrent + n_coda >= 1)")
        if self.looped and self.n_recurrent < 1:
            raise ConfigError(f"ModelConfig.n_recurrent must be >= 1 for a looped model (injection="
                             f"{self.injection!r}); use injection='none' for a fixed-depth GPT")
        if self.depth_scheme == "poisson_lognormal" and self.mean_recurrence <= self.backprop_depth:
            raise ConfigError(
                f"ModelConfig.mean_recurrence ({self.mean_recurrence}) must exceed backprop_depth "
                f"({self.backprop_depth}) for depth_scheme='poisson_lognormal' (its no-grad part has mean "
                "μ_rec − μ_bwd)")

    # ----------------------------------------------------------------------------------------------
    @property
    def looped(self) -> bool:
        return self.injection != "none"

    @property
    def padded_vocab_size(self) -> int:
        return math.ceil(self.vocab_size / self.padding_multiple) * self.padding_multiple

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def n_layers(self) -> int:
        return self.n_prelude + self.n_recurrent + self.n_coda

    @property
    def value_embedding_layers(self) -> tuple[int, ...]:
        """Stack indices with a value-embedding table and gate: the last block and every other one
        before it, i % 2 == (L−1) % 2 over the P+R+C stack, for tables and gates alike (docs/design.md §5)."""
        if not self.value_embeddings:
            return ()
        return tuple(i for i in range(self.n_layers) if has_value_embedding(i, self.n_layers))

    @property
    def state_std(self) -> float:
        """Std of the like-init state and of the embedding: √(2/(5d)) (official parcae_lm/models/parcae/parcae.py)."""
        return math.sqrt(2.0 / (5.0 * self.d_model))

    def effective_depth(self, loops: Optional[int] = None) -> int:
        """Blocks a token passes through at ``loops`` iterations (default μ_rec): P + T·R + C."""
        if not self.looped:
            return self.n_layers
        loops = self.mean_recurrence if loops is None else loops
        return self.n_prelude + loops * self.n_recurrent + self.n_coda

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------------
# Presets. Transformer setup: paper Tables 18-19 (P/R/C = 2/2/2 ... 8/8/8, head dim 128, F = 4d,
# vocab 32,768). The GPT baseline is the Parcae stack unrolled once (same blocks, no loop).
_TRANSFORMER_SIZES = {  # name: (d_model, heads, layers per stage)
    "140m": (768, 6, 2),
    "370m": (1024, 8, 4),
    "770m": (1280, 10, 6),
    "1.3b": (1536, 12, 8),
}

# Huginn (RDM) setup: paper Table 17, vocab 65,536, SwiGLU, no value embeddings or QK-norm, Takase init.
_HUGINN_SIZES = {  # name: (d_model, heads, P, R, C, d_ff, mean_recurrence, backprop_depth)
    "100m": (1024, 8, 1, 1, 1, 3520, 16, 8),
    "350m": (2048, 16, 1, 2, 1, 7040, 8, 4),
}


def _build_presets() -> dict[str, ModelConfig]:
    presets: dict[str, ModelConfig] = {}
    for size, (d, heads, stage) in _TRANSFORMER_SIZES.items():
        common = dict(vocab_size=32768, block_size=2048, d_model=d, n_heads=heads, d_ff=4 * d,
                      n_prelude=stage, n_recurrent=stage, n_coda=stage)
        presets[f"parcae-{size}"] = ModelConfig(name=f"parcae-{size}", **common)
        presets[f"gpt-{size}"] = ModelConfig(name=f"gpt-{size}", injection="none", **common)
    for size, (d, heads, p, r, c, ff, mu, bwd) in _HUGINN_SIZES.items():
        # Head count is not given by Table 17; 128-dim heads as in the Transformer setup.
        common = dict(vocab_size=65536, block_size=4096, d_model=d, n_heads=heads, d_ff=ff,
                      n_prelude=p, n_recurrent=r, n_coda=c, mlp="swiglu", qk_norm=False,
                      value_embeddings=False, init="scaled", mean_recurrence=mu, backprop_depth=bwd)
        # Parcae in the Huginn setup: pre-norm blocks + the dynamical-system parameters (P App. P.1).
        presets[f"parcae-{size}"] = ModelConfig(name=f"parcae-{size}", **common)
        # RDM: sandwich norm, concat injection, no readout C and no prelude norm (Huginn's recipe).
        presets[f"rdm-{size}"] = ModelConfig(name=f"rdm-{size}", block="sandwich", injection="concat",
                                             readout=False, prelude_norm=False, **common)
    # Named variants the paper's tables train (recipes reference model pieces by name).
    for size in _HUGINN_SIZES:
        # Table 2's "Pre-Norm RDM": the RDM with pre-norm instead of sandwich blocks.
        presets[f"rdm-{size}-prenorm"] = presets[f"rdm-{size}"].replace(name=f"rdm-{size}-prenorm", block="prenorm")
        # Table 8: Parcae with one depth per micro-batch instead of per sequence.
        presets[f"parcae-{size}-per-batch"] = presets[f"parcae-{size}"].replace(
            name=f"parcae-{size}-per-batch", depth_granularity="per_batch")
    # Tables 9-10: the early RDM runs used Huginn's sampler (one depth per micro-batch), backprop depth 4.
    presets["rdm-100m-huginn-sampler"] = presets["rdm-100m"].replace(
        name="rdm-100m-huginn-sampler", depth_scheme="huginn", depth_granularity="per_batch", backprop_depth=4)
    # Table 4, the 140M ladder in the Transformer setup: RDM (concat, per-batch, no prelude norm) ->
    # + constrained (diagonal) A -> + per-sequence sampling -> + prelude norm (= parcae-140m).
    base = presets["parcae-140m"]
    presets["ladder-140m-rdm"] = base.replace(name="ladder-140m-rdm", injection="concat", prelude_norm=False,
                                              depth_granularity="per_batch")
    presets["ladder-140m-constrained"] = base.replace(name="ladder-140m-constrained", prelude_norm=False,
                                                      depth_granularity="per_batch")
    presets["ladder-140m-per-sequence"] = base.replace(name="ladder-140m-per-sequence", prelude_norm=False)
    # CPU miniatures (recipes/mini/, docs/miniatures.md): the paper's model families at d = 128 on the
    # embedded corpus (vocabulary 4,096). Transformer setup: P/R/C 1/2/1; the GPT is that stack run once.
    mini = dict(vocab_size=4096, block_size=256, d_model=128, n_heads=4, d_ff=512, n_prelude=1, n_recurrent=2,
                n_coda=1, mean_recurrence=4, backprop_depth=2)
    presets["mini-parcae"] = ModelConfig(name="mini-parcae", **mini)
    presets["mini-gpt"] = ModelConfig(name="mini-gpt", injection="none", **mini)
    presets["mini-rdm"] = ModelConfig(name="mini-rdm", injection="concat", prelude_norm=False, **mini)
    presets["mini-parcae-per-batch"] = presets["mini-parcae"].replace(name="mini-parcae-per-batch",
                                                                      depth_granularity="per_batch")
    # Huginn setup (Table 2 in miniature): SwiGLU (d_ff ≈ 8d/3), no value embeddings or QK-norm, Takase init.
    huginn = dict(mini, d_ff=352, mlp="swiglu", qk_norm=False, value_embeddings=False, init="scaled")
    presets["mini-huginn-parcae"] = ModelConfig(name="mini-huginn-parcae", **huginn)
    presets["mini-huginn-rdm-prenorm"] = ModelConfig(name="mini-huginn-rdm-prenorm", injection="concat",
                                                     readout=False, prelude_norm=False, **huginn)
    presets["mini-huginn-rdm-resnorm"] = presets["mini-huginn-rdm-prenorm"].replace(
        name="mini-huginn-rdm-resnorm", block="sandwich")
    # The main job (scripts/demo.sh): one recurrent block between one-block prelude and coda, no value embeddings
    # (they hand every layer the token identity, a depth-free shortcut), so the model's depth comes from its loop.
    presets["mini-demo"] = ModelConfig(name="mini-demo", vocab_size=4096, block_size=256, d_model=64, n_heads=4,
                                       d_ff=256, n_prelude=1, n_recurrent=1, n_coda=1, value_embeddings=False,
                                       mean_recurrence=8, backprop_depth=4)
    # Parameter-limited GPT vs Parcae (docs/miniatures.md): the same three blocks at d = 32, run once or looped.
    limited = dict(vocab_size=4096, block_size=256, d_model=32, n_heads=2, d_ff=128, n_prelude=1, n_recurrent=1,
                   n_coda=1, value_embeddings=False)
    presets["mini-param-limited-parcae"] = ModelConfig(name="mini-param-limited-parcae", mean_recurrence=8,
                                                       backprop_depth=4, **limited)
    presets["mini-param-limited-gpt"] = ModelConfig(name="mini-param-limited-gpt", injection="none", **limited)
    # A debug model for tests and CPU demos (torchtitan's "debugmodel" idea).
    presets["parcae-debug"] = ModelConfig(
        name="parcae-debug", vocab_size=4096, block_size=256, d_model=64, n_heads=4, d_ff=256,
        n_prelude=1, n_recurrent=1, n_coda=1, mean_recurrence=4, backprop_depth=2)
    return presets


PRESETS: dict[str, ModelConfig] = _build_presets()

# Exact parameter counts the presets reproduce (tests/model/test_presets.py checks every one).
# Tables 18-19 match to the parameter. Table 17 (Huginn setup): the RDM counts match exactly; the
# Parcae counts do not under any single reading of the paper:
#   * parcae-100m: the full Parcae (pre-norm blocks + A_log, dt_bias, B, readout C, prelude norm) has
#     114,239,488 parameters, 3·d = 3,072 fewer than the table's 114,242,560, which repeats the
#     RDM-100M figure digit for digit (the RDM's sandwich norms add 2d per block, its concat 2d² ≈ B+C).
#   * parcae-350m: the full Parcae has 382,754,816; the table's 378,558,464 is exactly the reading
#     *without* readout C and prelude norm (d² + d fewer, ModelConfig(readout=False, prelude_norm=False)),
#     but that reading gives 113,189,888 at 100M, not the table's figure.
# We keep the full Parcae of paper §2 (with C and prelude norm) for both sizes.
PAPER_PARAMETER_COUNTS = {
    "gpt-140m": 143_141_184, "gpt-370m": 385_903_104, "gpt-770m": 773_375_040, "gpt-1.3b": 1_333_868_544,
    "parcae-140m": 144_323_136, "parcae-370m": 388_003_328, "parcae-770m": 776_655_680,
    "parcae-1.3b": 1_338_591_744,
    "rdm-100m": 114_242_560, "rdm-350m": 382_765_056,
    "parcae-100m": 114_242_560, "parcae-350m": 378_558_464,
}
PRESET_PARAMETER_COUNTS = {
    **PAPER_PARAMETER_COUNTS,
    "parcae-100m": 114_239_488,  # table: 114,242,560 (see above)
    "parcae-350m": 382_754_816,  # table: 378,558,464 = this preset with readout=False, prelude_norm=False
}


def preset(name: str, **overrides) -> ModelConfig:
    """A paper preset by name (``parcae-140m``, ``gpt-1.3b``, ``rdm-100m``, ...), optionally overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(sorted(PRESETS))}")
    return PRESETS[name].replace(**overrides)
