"""KV cache of a looped model: one store per prelude/coda block, and per (iteration slot, recurrent block).

The cache is laid out in *columns*: column c of row b holds the c-th token written for that row (prompt tokens,
then generated ones). Padding columns are never marked present, so no query attends to them; a row's
position (for RoPE and the initial state) counts only its real tokens, so left- and right-padded prompts see
exactly what they would see alone.

A token that exits the loop early never computes the keys/values of its later iterations. Which entry a later
token reads instead is the KV policy (the idea comes from Huginn's cache, seal-rg/recurrent-pretraining,
``recpre/raven_modeling_minimal.py``, ``HuginnDynamicCache``):

* ``full``    every token runs all ``max_loops`` iterations (only its output is taken at the exit), so every entry
              exists: the exact reference, no compute saved.
* ``latest``  a token stops computing at its exit; for an iteration it never ran, later tokens read its last
              computed iteration of the same recurrent block.
* ``ring:K``  K slots per recurrent block, shared by iterations t ≡ s (mod K) (Huginn's ``compress-s{K}``): memory is
              K·R entries per token whatever the depth; exact for depths <= K.

    cache = LoopKVCache(model.config, batch_size=2, capacity=128, policy=KVPolicy.parse("ring:4"), adaptive=True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from parcae.model import ModelConfig


@dataclass(frozen=True)
class KVPolicy:
    kind: str                  # "full" | "latest" | "ring"
    slots: Optional[int] = None  # K for ring

    @classmethod
    def parse(cls, text: str) -> "KVPolicy":
        text = str(text).strip()
        if text in ("full", "latest"):
            return cls(text)
        if text.startswith("ring:"):
            k = text.split(":", 1)[1]
            if not k.isdigit() or int(k) < 1:
                raise ValueError(f"KV policy {text!r}: ring:K needs an integer K >= 1")
            return cls("ring", int(k))
        raise ValueError(f"unknown KV policy {text!r}; choose full, latest or ring:K (e.g. ring:4)")

    def slot(self, iteration: int) -> int:
        return iteration % self.slots if self.kind == "ring" else iteration

    def __str__(self) -> str:
        return f"ring:{self.slots}" if self.kind == "ring" else self.kind


class _Store:
    """Keys and values [B, kv_heads, capacity, head_dim] and which (row, column) entries were written."""

    def __init__(self, B: int, kv_heads: int, capacity: int, head_dim: int, device, dtype) -> None:
        self.k = torch.zeros(B, kv_heads, capacity, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.filled = torch.zeros(B, capacity, dtype=torch.bool, device=device)

    def write(self, rows: Tensor, cols: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> None:
        """k, v [B, S, kv_heads, hd] into columns cols [B, S] where mask [B, S]."""
        m = mask[..., None, None]
        self.k[rows, :, cols] = torch.where(m, k.to(self.k.dtype), self.k[rows, :, cols])
        self.v[rows, :, cols] = torch.where(m, v.to(self.v.dtype), self.v[rows, :, cols])
        self.filled[rows, cols] |= mask

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class LoopKVCache:
    """All KV stores of one batch; :meth:`begin` sets up the columns and mask of the tokens computed next."""

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, policy: KVPolicy, adaptive: bool,
                 device=None, dtype=torch.float32) -> None:
        self.config, self.policy, self.B, self.capacity = config, policy, batch_size, capacity
        self._shape = (batch_size, config.kv_heads, capacity, config.head_dim)
        self._device, self._dtype = device, dtype
        make = lambda: _Store(*self._shape[:2], capacity, config.head_dim, device, dtype)  # noqa: E731
        n_once = config.n_prelude + config.n_coda + (0 if config.looped else config.n_recurrent)
        self.once = [make() for _ in range(n_once)]                 # prelude, (GPT: middle stack), coda
        self.slots: list[dict[int, _Store]] = [{} for _ in range(config.n_recurrent if config.looped else 0)]
        # A token's last computed iteration per recurrent block, read where a slot lacks it (latest / ring).
        self.last = [make() for _ in self.slots] if adaptive and policy.kind != "full" else None
        self.present = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.rows = torch.arange(batch_size, device=device)[:, None]
        self.cols: Optional[Tensor] = None
        self.mask: Optional[Tensor] = None
        self.length = 0  # columns in use (max over rows)

    # -- one forward chunk -----------------------------------------------------------------------------------
    def begin(self, cols: Tensor, real: Tensor) -> None:
        """The next tokens go to columns cols [B, S]; real [B, S] marks the ones that are not padding."""
        if int(cols.max()) >= self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens per row; column {int(cols.max())} is beyond")
        self.cols = cols
        self.present[self.rows, cols] = torch.where(real, True, self.present[self.rows, cols])
        self.length = max(self.length, int(cols.max()) + 1)
        L = self.length
        key_cols = torch.arange(L, device=cols.device)
        causal = key_cols[None, None, :] <= cols[..., None]                     # [B, S, L]
        self.mask = (causal & self.present[:, None, :L]) | (key_cols[None, None, :] == cols[..., None])
        self.mask = self.mask[:, None]  # [B, 1, S, L]; a padding query sees only itself (no empty softmax rows)

    def once_view(self, index: int, write: Tensor) -> "_View":
        return _View(self, self.once[index], None, write)

    def loop_view(self, block: int, iteration: int, write: Tensor) -> "_View":
        slot = self.policy.slot(iteration)
        store = self.slots[block].get(slot)
        if store is None:
            store = self.slots[block][slot] = _Store(*self._shape[:2], self.capacity, self._shape[3],
                                                     self._device, self._dtype)
        return _View(self, store, self.last[block] if self.last is not None else None, write)

    # -- accounting ------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        stores = [*self.once, *(s for slots in self.slots for s in slots.values()), *(self.last or [])]
        return sum(s.nbytes() for s in stores)

    def entries_per_token_by_shape(self, loops: int) -> int:
        """KV entries (key + value vectors of one block) per token the model's shape calls for at ``loops``."""
        c = self.config
        if not c.looped:
            return c.n_layers
        per_loop = min(loops, self.policy.slots) if self.policy.kind == "ring" else loops
        return c.n_prelude + c.n_coda + per_loop * c.n_recurrent + (c.n_recurrent if self.last is not None else 0)


class _View:
    """What one attention layer sees: store the new keys/values (where allowed), return all readable ones."""

    def __init__(self, cache: LoopKVCache, store: _Store, fallback: Optional[_Store], write: Tensor) -> None:
        self.cache, self.store, self.fallback, self.write = cache, store, fallback, write

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c = self.cache
        self.store.write(c.rows, c.cols, k, v, self.write)
        if self.fallback is not None:
            self.fallback.write(c.rows, c.cols, k, v, self.write)
        L = c.length
        keys, values = self.store.k[:, :, :L], self.store.v[:, :, :L]
        if self.fallback is not None:
            missing = (c.present[:, :L] & ~self.store.filled[:, :L])
            if bool(missing.any()):
                use = missing[:, None, :, None]
                keys = torch.where(use, self.fallback.k[:, :, :L], keys)
                values = torch.where(use, self.fallback.v[:, :, :L], values)
        return keys, values, c.mask
