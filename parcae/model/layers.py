"""Transformer building blocks shared by Parcae, the RDM baseline and GPT (plain PyTorch).

Math follows the official implementation exactly (parcae_lm/modules/{blocks,mixer,mlp,norms}.py):
RMSNorm in fp32 cast back before the weight, interleaved (GPT-J) RoPE with base 50,000 computed in
fp32, parameter-free QK-norm *after* RoPE, ReLU² with the 0.5 factor, gated value embeddings reading
the first 32 normed channels. The Huginn setup adds sandwich ("residual") norm and SwiGLU.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import VALUE_GATE_CHANNELS, ModelConfig


class RMSNorm(nn.Module):
    """x / rms(x) computed in fp32, cast back to the input dtype, then times a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight
        if not torch.is_grad_enabled() and x.is_cpu and x.dtype == weight.dtype == torch.float32:
            # torch's CPU rms_norm is this very composite (pow, mean, + eps, rsqrt, product, then the weight: ATen's
            # rms_norm_composite), bit for bit in fp32, in one call instead of six (inference; training keeps the
            # ops below, whose backward is autograd's)
            return torch.rms_norm(x, weight.shape, weight, self.eps)
        xf = x if x.dtype == torch.float32 else x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed if normed.dtype == x.dtype else normed.to(x.dtype)) * weight


def rope_table(seq_len: int, head_dim: int, base: float, device=None) -> Tensor:
    """[seq_len, head_dim/2, 2] fp32 table of (cos, sin) of p·base^(−2i/hd).

    Written exactly as the official buffer (bit-exact; algebraically equal formulas differ by ~1e-7).
    """
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device).float(), inv)
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def rope_rows(table: Tensor, positions: Tensor) -> Tensor:
    """The rotation of each token at ``positions`` [B, S], laid out for :func:`apply_rope`: [B, S, 2, 1, hd] fp32,
    (c0, c0, c1, c1, ...) and (−s0, s0, −s1, s1, ...) from the table's rows. Computed once per cached step, so each
    attention call rotates with one flip, two products and a sum instead of re-slicing the table."""
    rows = table[positions]                                          # [B, S, hd/2, 2]
    cos, sin = rows[..., 0], rows[..., 1]
    cos2 = torch.stack([cos, cos], dim=-1).flatten(-2)
    sin2 = torch.stack([-sin, sin], dim=-1).flatten(-2)
    return torch.stack([cos2, sin2], dim=2)[:, :, :, None]


def apply_rope(x: Tensor, table: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (x[2i], x[2i+1]) of x [B, S, H, hd] by the table's angles.

    Interleaved (GPT-J / complex) convention, not NeoX half-rotation; fp32 math, cast back. The table is
    either the first S rows of the position table, or for tokens at arbitrary positions (cached decoding, padded
    batches) rows already picked per token: [B, S, hd/2, 2], or :func:`rope_rows`' [B, S, 2, 1, hd].
    """
    xf = x if x.dtype == torch.float32 else x.float()
    if table.dim() == 5:
        # (x0, x1) -> (x0·c + x1·(−s), x1·c + x0·s): the same products and sums as below, bit for bit (x1·(−s) is
        # −(x1·s) exactly, and a + (−b) is a − b), in three elementwise ops over the whole head.
        cos, sin = table.unbind(2)
        swapped = xf.reshape(xf.shape[:-1] + (-1, 2)).flip(-1).flatten(-2)
        out = xf * cos + swapped * sin
        return out if out.dtype == x.dtype else out.to(x.dtype)
    pairs = xf.unflatten(-1, (-1, 2))
    if table.dim() == 4:  # [B, S, hd/2, 2]: rows already picked per token
        cos, sin = table[:, :, None, :, 0], table[:, :, None, :, 1]
    else:
        cos = table[: x.shape[1], None, :, 0]
        sin = table[: x.shape[1], None, :, 1]
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x0 * cos - x1 * sin, x1 * cos + x0 * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with RoPE, optional QK-norm and an optional value-embedding gate."""

    def __init__(self, config: ModelConfig, has_value_embedding: bool) -> None:
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.kv_heads, self.head_dim = config.n_heads, config.kv_heads, hd
        self.qk_norm = config.qk_norm
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * hd, bias=False)
        self.out_proj = nn.Linear(config.n_heads * hd, d, bias=False)
        # v ← v + 2σ(W_g a[..., :32])·ve: one gate per KV head (nanochat value embeddings).
        self.ve_gate = nn.Linear(VALUE_GATE_CHANNELS, self.kv_heads, bias=False) if has_value_embedding else None

    def forward(self, a: Tensor, rope: Tensor, value_embedding: Optional[Tensor] = None, cache=None) -> Tensor:
        """Causal self-attention over ``a`` [B, S, d]; with ``cache`` (see :mod:`parcae.inference.cache`) the new
        keys/values are stored there and the queries attend to everything the cache allows (its mask)."""
        B, S, _ = a.shape
        q = self.q_proj(a).view(B, S, self.n_heads, self.head_dim)
        k = self.k_proj(a).view(B, S, self.kv_heads, self.head_dim)
        v = self.v_proj(a).view(B, S, self.kv_heads, self.head_dim)
        if self.ve_gate is not None:
            gate = 2 * torch.sigmoid(self.ve_gate(a[..., :VALUE_GATE_CHANNELS]))
            v = v + gate.unsqueeze(-1) * value_embedding.view(B, S, self.kv_heads, self.head_dim)
        if cache is None:
            q, k = self._rotate(q, rope), self._rotate(k, rope)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                enable_gqa=self.kv_heads != self.n_heads)  # KV heads shared by consecutive query heads
        else:  # the queries and keys rotated (and normed) together: one call of each instead of two
            q, k = self._rotate(torch.cat([q, k], 2), rope).split_with_sizes([self.n_heads, self.kv_heads], 2)
            keys, values, mask = cache.update(k, v)  # [B, kv_heads, L, hd] x2, bool [B, 1, S, L]
            y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                               enable_gqa=self.kv_heads != self.n_heads)
        return self.out_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))  # B may be 0

    def _rotate(self, x: Tensor, rope: Tensor) -> Tensor:
        """RoPE, then the parameter-free QK-norm (eps=None: the dtype's machine epsilon); both act on each head's
        channels alone, so rotating queries and keys stacked on the head axis is bit for bit rotating each."""
        x = apply_rope(x, rope)
        return torch.rms_norm(x, (self.head_dim,)) if self.qk_norm else x


class ReLU2MLP(nn.Module):
    """down(0.5·relu(up(x))²): nanochat's MLP, with the official 0.5 factor."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(0.5 * torch.relu(self.up_proj(x)).square())


class SwiGLU(nn.Module):
    """down(silu(gate(x)) ⊙ up(x)): the Huginn setup's gated MLP (3·d·d_ff parameters)."""

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, d_ff, bias=False)
        self.up_proj = nn.Linear(d_model, d_ff, bias=False)
        self.down_proj = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One Transformer block.

    prenorm:  x ← x + Attn(N₁(x));            x ← x + MLP(N₂(x))
    sandwich: x ← N₃(Attn(N₁(x)) + x);        x ← N₄(MLP(N₂(x)) + x)     (Huginn RDM, paper App. P.1)
    """

    def __init__(self, config: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index  # position in the P+R+C stack (selects the value-embedding table)
        self.sandwich = config.block == "sandwich"
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config, has_value_embedding=index in config.value_embedding_layers)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = (ReLU2MLP if config.mlp == "relu2" else SwiGLU)(config.d_model, config.d_ff)
        if self.sandwich:
            self.attn_out_norm = RMSNorm(config.d_model, config.norm_eps)
            self.mlp_out_norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, value_embedding: Optional[Tensor] = None, cache=None) -> Tensor:
        if self.sandwich:
            x = self.attn_out_norm(self.attn(self.attn_norm(x), rope, value_embedding, cache) + x)
            return self.mlp_out_norm(self.mlp(self.mlp_norm(x)) + x)
        x = x + self.attn(self.attn_norm(x), rope, value_embedding, cache)
        return x + self.mlp(self.mlp_norm(x))
