"""The eval-time initial state h₀ as a pure function of (seed, sequence, position).

A cached generator computes one token at a time, a full forward all of them at once, a batched generator
several prompts side by side. For all three to give the same numbers, a token's like-init noise must not
depend on how many other tokens are drawn with it, so it cannot come from a sequential random stream.
Instead each channel of each token gets its own counter-based uniform number: an integer hash of
(seed, sequence, position, channel), turned into a ±3σ-truncated normal by the inverse normal CDF.

    from parcae.model.state import positional_noise
    h0 = positional_noise(seed=0, sequences=torch.tensor([0]), positions=torch.arange(5)[None], dim=64, std=0.08)
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_TRUNCATION = 3.0  # like-init truncates at ±3σ
_PHI_LO = 0.5 * math.erfc(_TRUNCATION / math.sqrt(2))  # Φ(−3)
_PHI_SPAN = 1.0 - 2 * _PHI_LO                          # Φ(3) − Φ(−3)


def _mix32(x: Tensor) -> Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply, "lowbias32"), computed in int64 and kept to 32 bits.

    int64 products wrap modulo 2⁶⁴, which leaves the low 32 bits exact."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _constant_keys(seed: int, dim: int, device) -> tuple[Tensor, Tensor]:
    """The parts of the hash that depend on the seed and the channel only: mix(seed + golden ratio) and
    channel·c₁ + c₂ for the ``dim`` channels."""
    seed_key = _mix32(torch.tensor(seed & _MASK32, dtype=torch.long, device=device) + 0x9E3779B9)
    channels = torch.arange(dim, device=device, dtype=torch.long)
    return seed_key, channels * 0xC2B2AE35 + 0x27D4EB2F


@functools.lru_cache(maxsize=64)
def _remembered_constant_keys(seed: int, dim: int, device) -> tuple[Tensor, Tensor]:
    """:func:`_constant_keys` once per (seed, dim, device), not once per cached step; ordinary tensors even when first
    asked for inside inference mode."""
    with torch.inference_mode(False):
        return _constant_keys(seed, dim, device)


def positional_noise(seed: int, sequences: Tensor, positions: Tensor, dim: int, std: float,
                     dtype: torch.dtype = torch.float32) -> Tensor:
    """Truncated-normal noise N(0, std²) cut at ±3·std, of shape [B, S, dim].

    Args:
        seed: a global seed (e.g. the run's or the user's ``--seed``).
        sequences: [B] integer identity of each sequence (two rows with the same identity get the same noise
            at the same position).
        positions: [B, S] position of each token in its own sequence (0 for its first token).
    """
    device = positions.device
    # (a graph being traced by torch.compile computes them itself: it keeps its own constants)
    constant = _constant_keys if torch.compiler.is_compiling() else _remembered_constant_keys
    seed_key, channel_keys = constant(int(seed), dim, device)
    key = _mix32(seed_key ^ sequences.to(device=device, dtype=torch.long)[:, None])     # [B, 1]
    key = _mix32(key ^ (positions.long() * 0x85EBCA6B))                                 # [B, S]
    bits = _mix32(key[..., None] ^ channel_keys)                                        # [B, S, dim]
    uniform = (bits.double() + 0.5) / 2.0**32                                           # in (0, 1)
    z = torch.special.ndtri(_PHI_LO + uniform * _PHI_SPAN).clamp(-_TRUNCATION, _TRUNCATION)
    return (z * std).to(dtype)
