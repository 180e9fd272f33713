"""Hugging Face configuration of a Parcae looped language model (self-contained: no import of ``parcae``).

This file is copied verbatim into every folder ``parcae export --format hf`` writes, beside modeling_parcae.py, so
``AutoConfig.from_pretrained(folder, trust_remote_code=True)`` works without parcae installed. The fields are the
architecture fields of parcae's own model configuration (same names, same meaning) plus ``num_loops``, the number
of loop iterations a forward runs when it is not given one.

    from transformers import AutoConfig
    config = AutoConfig.from_pretrained("out/mini-parcae-hf", trust_remote_code=True)
    config.num_loops = 16          # deeper by default (a forward or generate call can also pass num_loops=16)
"""

from __future__ import annotations

import math

from transformers import PretrainedConfig

INJECTIONS = ("none", "add", "concat", "diagonal", "diagonal_zoh")


class ParcaeConfig(PretrainedConfig):
    """Architecture of a Parcae / RDM / GPT model, with the Hugging Face standard names as aliases.

    ``vocab_size`` is the tokenizer's vocabulary (the logits' width); the embedding holds ``padded_vocab_size`` rows
    (``vocab_size`` rounded up to ``padding_multiple``). ``injection="none"`` is a fixed-depth GPT (no loop).
    ``num_hidden_layers`` counts the attention layers a forward at ``num_loops`` runs (prelude + num_loops ·
    recurrent + coda): one key/value cache layer each.
    """

    model_type = "parcae"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map = {"hidden_size": "d_model", "num_attention_heads": "n_heads", "intermediate_size": "d_ff",
                     "max_position_embeddings": "block_size"}

    def __init__(self, vocab_size: int = 32768, padding_multiple: int = 64, block_size: int = 2048,
                 d_model: int = 768, n_heads: int = 6, n_kv_heads: int | None = None, d_ff: int = 3072,
                 n_prelude: int = 2, n_recurrent: int = 2, n_coda: int = 2, block: str = "prenorm",
                 mlp: str = "relu2", qk_norm: bool = True, value_embeddings: bool = True, rope_base: float = 50000.0,
                 norm_eps: float = 1e-5, injection: str = "diagonal", readout: bool = True, prelude_norm: bool = True,
                 state_init: str = "like-init", mean_recurrence: int = 8, backprop_depth: int = 4,
                 num_loops: int | None = None, state_seed: int = 0, name: str = "custom",
                 bos_token_id: int | None = 0, eos_token_id: int | None = 1, pad_token_id: int | None = 2,
                 tie_word_embeddings: bool = False, use_cache: bool = True, **kwargs) -> None:
        for derived in ("num_hidden_layers", "num_key_value_heads", "head_dim", "padded_vocab_size"):
            kwargs.pop(derived, None)  # written to config.json for other tools; always recomputed here
        if injection not in INJECTIONS:
            raise ValueError(f"ParcaeConfig.injection must be one of {INJECTIONS}, got {injection!r}")
        if d_model % n_heads:
            raise ValueError(f"ParcaeConfig.d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        self.vocab_size, self.padding_multiple, self.block_size = vocab_size, padding_multiple, block_size
        self.d_model, self.n_heads, self.n_kv_heads, self.d_ff = d_model, n_heads, n_kv_heads, d_ff
        self.n_prelude, self.n_recurrent, self.n_coda = n_prelude, n_recurrent, n_coda
        self.block, self.mlp, self.qk_norm, self.value_embeddings = block, mlp, qk_norm, value_embeddings
        self.rope_base, self.norm_eps = rope_base, norm_eps
        self.injection, self.readout, self.prelude_norm, self.state_init = injection, readout, prelude_norm, state_init
        self.mean_recurrence, self.backprop_depth = mean_recurrence, backprop_depth
        self.num_loops = mean_recurrence if num_loops is None else num_loops
        self.state_seed, self.name, self.use_cache = state_seed, name, use_cache
        self.num_key_value_heads = n_kv_heads or n_heads
        self.head_dim = d_model // n_heads
        self.padded_vocab_size = math.ceil(vocab_size / padding_multiple) * padding_multiple
        self.num_hidden_layers = self.cache_layers(self.num_loops)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def looped(self) -> bool:
        return self.injection != "none"

    @property
    def n_layers(self) -> int:
        """Distinct blocks (prelude + recurrent + coda)."""
        return self.n_prelude + self.n_recurrent + self.n_coda

    @property
    def state_std(self) -> float:
        """Std of the like-init initial state: √(2/(5d))."""
        return math.sqrt(2.0 / (5.0 * self.d_model))

    @property
    def value_embedding_layers(self) -> tuple[int, ...]:
        """Blocks with a value-embedding table and gate: the last block and every other one before it."""
        if not self.value_embeddings:
            return ()
        return tuple(i for i in range(self.n_layers) if i % 2 == (self.n_layers - 1) % 2)

    def cache_layers(self, loops: int) -> int:
        """Attention layers (key/value cache layers) of a forward at ``loops`` iterations."""
        if not self.looped:
            return self.n_layers
        return self.n_prelude + loops * self.n_recurrent + self.n_coda
