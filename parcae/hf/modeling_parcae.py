"""Hugging Face model of a Parcae looped language model (self-contained: torch + transformers, no import of ``parcae``).

This file is copied verbatim into every folder ``parcae export --format hf`` writes, so anyone can load it with

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(folder)                     # adds <|bos|> in front, as parcae does
    out = model.generate(**tok(["ROMEO:"], return_tensors="pt"), max_new_tokens=20, num_loops=8)

The math is parcae's (docs/design.md; parcae/model is the specification and tests/hf checks the logits against it):

    e       = N_pre(Prelude(embed(s)))             prelude blocks, then the prelude norm
    h_0     = like-init noise | 0                  eval: a pure function of (seed, position), see positional_noise
    h_{t+1} = R(Ā h_t + B̄ e),  t = 0 .. T−1         injection first, then the recurrent blocks
    logits  = embedᵀ N_f(Coda(C h_T))               readout C, coda blocks, final norm, tied head

``T`` is ``num_loops`` (a keyword of ``forward`` and ``generate``, default ``config.num_loops``). The key/value cache
(transformers' ``DynamicCache``) has one layer per prelude block, one per (iteration, recurrent block) and one per
coda block: layer ``P + t·R + r`` holds iteration t of recurrent block r. A cache belongs to one loop count.
Padded batches work through ``attention_mask``: a row's positions (RoPE and the initial state) count only its real
tokens and no query attends to padding, so a left-padded prompt gives what it gives alone. The loop runs a fixed
number of iterations (adaptive exit is parcae's own engine, ``parcae generate --exit``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_parcae import ParcaeConfig

VALUE_GATE_CHANNELS = 32  # the value-embedding gate reads the first 32 normed channels
IGNORE_INDEX = -100
# transformers renames the cache argument and output field from past_key_values to cache (deprecated in 5.2x):
# accept both, return the one this version's output class has.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


# -- layers --------------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back to the input dtype, then times a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


def rope_table(seq_len: int, head_dim: int, base: float, device=None) -> Tensor:
    """[seq_len, head_dim/2, 2] fp32 (cos, sin) of p·base^(−2i/hd); row p does not depend on seq_len."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of x [B, S, H, hd] by table [B, S, hd/2, 2] (interleaved,
    GPT-J convention, fp32 math, cast back)."""
    pairs = x.float().unflatten(-1, (-1, 2))
    cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1).flatten(-2).to(x.dtype)


_MASK32 = 0xFFFFFFFF
_TRUNCATION = 3.0
_PHI_LO = 0.5 * math.erfc(_TRUNCATION / math.sqrt(2))  # Φ(−3)
_PHI_SPAN = 1.0 - 2 * _PHI_LO


def _mix32(x: Tensor) -> Tensor:
    """32-bit integer finaliser (xor-shift-multiply) in int64, kept to 32 bits."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def positional_noise(seed: int, sequences: Tensor, positions: Tensor, dim: int, std: float,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """The eval-mode like-init state: N(0, std²) cut at ±3·std, [B, S, dim], a pure function of (seed, sequence,
    position, channel) (a counter-based hash through the inverse normal CDF), so a token's h₀ does not depend on
    how many tokens are computed with it (full forward, cached decoding and padded batches agree)."""
    device = positions.device
    key = _mix32(torch.tensor(int(seed) & _MASK32, dtype=torch.long, device=device) + 0x9E3779B9)
    key = _mix32(key ^ sequences.to(device=device, dtype=torch.long)[:, None])
    key = _mix32(key ^ (positions.long() * 0x85EBCA6B))
    channels = torch.arange(dim, device=device, dtype=torch.long)
    bits = _mix32(key[..., None] ^ (channels * 0xC2B2AE35 + 0x27D4EB2F))
    uniform = (bits.double() + 0.5) / 2.0**32
    z = torch.special.ndtri(_PHI_LO + uniform * _PHI_SPAN).clamp(-_TRUNCATION, _TRUNCATION)
    return (z * std).to(dtype)


class ParcaeAttention(nn.Module):
    """Causal attention with interleaved RoPE, optional parameter-free QK-norm (after RoPE) and an optional gated
    value embedding (v ← v + 2σ(W_g a[..., :32])·ve, one gate per KV head)."""

    def __init__(self, config: ParcaeConfig, has_value_embedding: bool) -> None:
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.num_key_value_heads, hd
        self.qk_norm = config.qk_norm
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.out_proj = nn.Linear(self.n_heads * hd, d, bias=False)
        self.ve_gate = nn.Linear(VALUE_GATE_CHANNELS, self.kv_heads, bias=False) if has_value_embedding else None

    def forward(self, a: Tensor, rope: Tensor, value_embedding: Optional[Tensor], mask: Optional[Tensor],
                cache: Optional[Cache], layer_idx: int) -> Tensor:
        B, S, _ = a.shape
        q = self.q_proj(a).view(B, S, self.n_heads, self.head_dim)
        k = self.k_proj(a).view(B, S, self.kv_heads, self.head_dim)
        v = self.v_proj(a).view(B, S, self.kv_heads, self.head_dim)
        if self.ve_gate is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(a[..., :VALUE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * value_embedding.view(B, S, self.kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if self.qk_norm:  # eps=None: the dtype's machine epsilon
            q, k = F.rms_norm(q, (self.head_dim,)), F.rms_norm(k, (self.head_dim,))
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(k, v, layer_idx)
        gqa = self.kv_heads != self.n_heads
        if mask is None:  # no cache history and no padding: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))


class ReLU2MLP(nn.Module):
    """down(0.5·relu(up(x))²)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(0.5 * F.relu(self.up_proj(x)).square())


class SwiGLU(nn.Module):
    """down(silu(gate(x)) ⊙ up(x))."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class ParcaeBlock(nn.Module):
    """prenorm: x ← x + Attn(N₁(x)); x ← x + MLP(N₂(x)).  sandwich: x ← N₃(Attn(N₁(x)) + x); x ← N₄(MLP(N₂(x)) + x)."""

    def __init__(self, config: ParcaeConfig, index: int) -> None:
        super().__init__()
        self.index = index  # position in the prelude + recurrent + coda stack (selects the value embedding)
        self.sandwich = config.block == "sandwich"
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = ParcaeAttention(config, has_value_embedding=index in config.value_embedding_layers)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = (ReLU2MLP if config.mlp == "relu2" else SwiGLU)(config.d_model, config.d_ff)
        if self.sandwich:
            self.attn_out_norm = RMSNorm(config.d_model, config.norm_eps)
            self.mlp_out_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, value_embedding: Optional[Tensor], mask: Optional[Tensor],
                cache: Optional[Cache], layer_idx: int) -> Tensor:
        attn = self.attn(self.attn_norm(x), rope, value_embedding, mask, cache, layer_idx)
        if self.sandwich:
            x = self.attn_out_norm(attn + x)
            return self.mlp_out_norm(self.mlp(self.mlp_norm(x)) + x)
        x = x + attn
        return x + self.mlp(self.mlp_norm(x))


# -- injections: h ← Ā h + B̄ e, with B̄ e computed once per forward ------------------------------------------------
class AddInjection(nn.Module):
    """h + e."""

    def input_term(self, e: Tensor) -> Tensor:
        return e

    def forward(self, h: Tensor, drive: Tensor) -> Tensor:
        return h + drive


class ConcatInjection(nn.Module):
    """W [h; e] (the RDM adapter), W = proj.weight [d, 2d] with h's columns first."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.proj = nn.Linear(2 * d_model, d_model, bias=False)

    def input_term(self, e: Tensor) -> Tensor:
        return F.linear(e, self.proj.weight[:, self.d_model:])

    def forward(self, h: Tensor, drive: Tensor) -> Tensor:
        return F.linear(h, self.proj.weight[:, : self.d_model]) + drive


class DiagonalInjection(nn.Module):
    """Ā = exp(−Δ⊙a), a = exp(A_log), Δ = softplus(dt_bias); B̄ = Δ⊙B (Euler) or (1−Ā)/a⊙B (exact ZOH)."""

    def __init__(self, d_model: int, zoh: bool = False) -> None:
        super().__init__()
        self.zoh = zoh
        self.A_log = nn.Parameter(torch.zeros(d_model))
        self.dt_bias = nn.Parameter(torch.zeros(d_model))
        self.B = nn.Parameter(torch.empty(d_model, d_model))

    def decay(self) -> Tensor:
        return torch.exp(-F.softplus(self.dt_bias) * torch.exp(self.A_log))

    def gain(self) -> Tensor:
        delta = F.softplus(self.dt_bias)
        if not self.zoh:
            return delta
        a = torch.exp(self.A_log)
        return -torch.expm1(-delta * a) / a

    def input_term(self, e: Tensor) -> Tensor:
        return self.gain() * F.linear(e, self.B)

    def forward(self, h: Tensor, drive: Tensor) -> Tensor:
        return self.decay() * h + drive


def make_injection(config: ParcaeConfig) -> Optional[nn.Module]:
    kind = config.injection
    if kind == "none":
        return None
    if kind == "add":
        return AddInjection()
    if kind == "concat":
        return ConcatInjection(config.d_model)
    return DiagonalInjection(config.d_model, zoh=kind == "diagonal_zoh")


# -- models --------------------------------------------------------------------------------------------------------
class ParcaePreTrainedModel(PreTrainedModel):
    config_class = ParcaeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = False
    _no_split_modules = ["ParcaeBlock"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        # Fresh models only (weights a checkpoint provides are never re-initialised): normal(0.02) projections,
        # embeddings at the like-init std, unit norms, and the official injection init Ā = 1/√5·I, B = I.
        super()._init_weights(module)
        if isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=self.config.state_std)
        elif isinstance(module, DiagonalInjection):
            init.zeros_(module.A_log)
            init.constant_(module.dt_bias, math.log(math.expm1(0.5 * math.log(5.0))))
            init.eye_(module.B)


class ParcaeModel(ParcaePreTrainedModel):
    """The stack up to the final norm; parameter names are parcae's own (``LoopedLM``'s state dict)."""

    def __init__(self, config: ParcaeConfig) -> None:
        super().__init__(config)
        V, d, P, R = config.padded_vocab_size, config.d_model, config.n_prelude, config.n_recurrent
        kv_width = config.num_key_value_heads * config.head_dim
        self.wte = nn.Embedding(V, d)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_width) for i in config.value_embedding_layers})
        self.prelude = nn.ModuleList(ParcaeBlock(config, i) for i in range(P))
        self.recurrent = nn.ModuleList(ParcaeBlock(config, P + j) for j in range(R))
        self.coda = nn.ModuleList(ParcaeBlock(config, P + R + k) for k in range(config.n_coda))
        looped = config.looped
        self.prelude_norm = RMSNorm(d, config.norm_eps) if looped and config.prelude_norm else None
        self.injection = make_injection(config)
        self.readout = nn.Linear(d, d, bias=False) if looped and config.readout else None
        self.final_norm = RMSNorm(d, config.norm_eps)
        self._rope: Optional[Tensor] = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.wte = value

    def _rope_rows(self, positions: Tensor) -> Tensor:
        """RoPE (cos, sin) rows [B, S, hd/2, 2] of the given positions."""
        need = int(positions.max()) + 1 if positions.numel() else 1
        need = max(need, self.config.block_size)
        if self._rope is None or self._rope.shape[0] < need or self._rope.device != positions.device:
            self._rope = rope_table(need, self.config.head_dim, self.config.rope_base, positions.device)
        return self._rope[positions]

    def loops_of(self, num_loops: Optional[int]) -> int:
        if not self.config.looped:
            if num_loops not in (None, 1):
                raise ValueError(f"num_loops={num_loops}: this is a fixed-depth model (injection='none'); it has no "
                                 "loop to set")
            return 1
        loops = self.config.num_loops if num_loops is None else num_loops
        if isinstance(loops, bool) or not isinstance(loops, int) or loops < 1:
            raise ValueError(f"num_loops must be an integer >= 1, got {loops!r}")
        return loops

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[Cache] = None,
                use_cache: Optional[bool] = None, num_loops: Optional[int] = None, cache: Optional[Cache] = None,
                **kwargs) -> BaseModelOutputWithPast:
        cfg = self.config
        past_key_values = past_key_values if past_key_values is not None else cache
        if input_ids is None:
            raise ValueError("ParcaeModel needs input_ids (value embeddings are looked up by token id; inputs_embeds "
                             "is not supported)")
        B, S = input_ids.shape
        loops = self.loops_of(num_loops)
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache()
        cache = past_key_values if use_cache or past_key_values is not None else None
        past = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            self._fit_cache(cache, loops)
        mask, positions = self._mask_and_positions(input_ids, attention_mask, position_ids, past)
        rope = self._rope_rows(positions)
        ve = {int(i): table(input_ids) for i, table in self.value_embeds.items()}

        x = self.wte(input_ids)
        for block in self.prelude:
            x = block(x, rope, ve.get(block.index), mask, cache, block.index)
        if self.injection is None:  # fixed-depth GPT: the same stack, run once
            for block in self.recurrent:
                x = block(x, rope, ve.get(block.index), mask, cache, block.index)
            first_coda = cfg.n_prelude + cfg.n_recurrent
        else:
            e = self.prelude_norm(x) if self.prelude_norm is not None else x
            drive = self.injection.input_term(e)
            h = self._initial_state(e, positions)
            # Training backpropagates only the last backprop_depth iterations (truncated BPTT, as parcae trains).
            frozen = loops - min(loops, cfg.backprop_depth) if torch.is_grad_enabled() else 0
            for t in range(loops):
                with torch.set_grad_enabled(torch.is_grad_enabled() and t >= frozen):
                    u = self.injection(h, drive)
                    for r, block in enumerate(self.recurrent):
                        u = block(u, rope, ve.get(block.index), mask, cache, cfg.n_prelude + t * cfg.n_recurrent + r)
                    h = u
            x = self.readout(h) if self.readout is not None else h
            first_coda = cfg.n_prelude + loops * cfg.n_recurrent
        for k, block in enumerate(self.coda):
            x = block(x, rope, ve.get(block.index), mask, cache, first_coda + k)
        return BaseModelOutputWithPast(last_hidden_state=self.final_norm(x), **{_CACHE_FIELD: cache})

    def _fit_cache(self, cache: Cache, loops: int) -> None:
        """A cache holds one loop count's layers: add layers for a deeper forward, refuse a cache of another count."""
        made_for = getattr(cache, "parcae_num_loops", None)
        if made_for is not None and made_for != loops and cache.get_seq_length() > 0:
            raise ValueError(f"this key/value cache was filled at num_loops={made_for}; a forward at num_loops={loops} "
                             "cannot reuse it (start a new cache)")
        cache.parcae_num_loops = loops
        need = self.config.cache_layers(loops)
        if getattr(cache, "layer_class_to_replicate", None) is None:
            while len(cache.layers) < need:
                cache.layers.append(DynamicLayer())

    def _mask_and_positions(self, input_ids: Tensor, attention_mask: Optional[Tensor],
                            position_ids: Optional[Tensor], past: int) -> tuple[Optional[Tensor], Tensor]:
        """Boolean attention mask [B, 1, S, past+S] (None for plain causal attention) and positions [B, S]."""
        B, S = input_ids.shape
        L = past + S
        dev = input_ids.device
        if attention_mask is not None:
            if attention_mask.dim() != 2:
                raise ValueError(f"attention_mask must be [batch, past + new tokens], got {tuple(attention_mask.shape)}")
            if attention_mask.shape[1] == S and past:  # only the new tokens' mask: the cached ones were real
                attention_mask = torch.cat([attention_mask.new_ones(B, past), attention_mask], 1)
            if attention_mask.shape[1] != L:
                raise ValueError(f"attention_mask covers {attention_mask.shape[1]} tokens, expected {L} "
                                 f"({past} cached + {S} new)")
            real = attention_mask.bool()
        if position_ids is None:
            if attention_mask is not None:  # count only real tokens (left padding)
                position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)[:, -S:]
            else:
                position_ids = torch.arange(past, L, device=dev)[None].expand(B, S)
        positions = position_ids.to(dev).long().expand(B, S)
        if past == 0 and (attention_mask is None or bool(real.all())):
            return None, positions
        key_cols = torch.arange(L, device=dev)
        query_cols = torch.arange(past, L, device=dev)
        mask = (key_cols[None, :] <= query_cols[:, None])[None]                      # [1, S, L] causal
        if attention_mask is not None:
            mask = mask & real[:, None, :]
        mask = mask | (key_cols[None, :] == query_cols[:, None])[None]              # a padding query sees itself
        return mask[:, None].expand(B, 1, S, L), positions

    def _initial_state(self, e: Tensor, positions: Tensor) -> Tensor:
        cfg = self.config
        if cfg.state_init == "zero":
            return torch.zeros_like(e)
        std = cfg.state_std
        if self.training:  # fresh noise each forward, as in training
            h = torch.empty(e.shape, device=e.device, dtype=torch.float32)
            nn.init.trunc_normal_(h, 0.0, std, -3 * std, 3 * std)
            return h.to(e.dtype)
        sequences = torch.zeros(e.shape[0], dtype=torch.long, device=e.device)
        return positional_noise(cfg.state_seed, sequences, positions, cfg.d_model, std, e.dtype)


class ParcaeForCausalLM(ParcaePreTrainedModel, GenerationMixin):
    """Logits over the tokenizer's vocabulary (the padded embedding rows are cut off) from the tied embedding."""

    def __init__(self, config: ParcaeConfig) -> None:
        super().__init__(config)
        self.model = ParcaeModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.wte

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.model.wte = value

    def forward(self, input_ids: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None, past_key_values: Optional[Cache] = None,
                inputs_embeds: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                use_cache: Optional[bool] = None, num_loops: Optional[int] = None, logits_to_keep: int = 0,
                cache: Optional[Cache] = None, **kwargs) -> CausalLMOutputWithPast:
        """``labels`` are the input ids (shifted here; -100 is ignored); ``num_loops`` overrides config.num_loops;
        ``cache`` is the newer transformers' name of ``past_key_values``."""
        if inputs_embeds is not None:
            raise ValueError("ParcaeForCausalLM takes input_ids, not inputs_embeds (value embeddings are looked up by "
                             "token id)")
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values if past_key_values is not None else cache,
                         use_cache=use_cache, num_loops=num_loops)
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = F.linear(hidden, self.model.wte.weight[: self.config.vocab_size]).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten().long().to(logits.device),
                                   ignore_index=IGNORE_INDEX)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})
