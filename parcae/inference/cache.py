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

    def write(self, rows: Tensor, cols: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> None:
        """k, v [n, S, kv_heads, hd] of rows rows [n, 1] into columns cols [n, S] where mask [n, S] (None: all)."""
        if mask is None:
            self.k[rows, :, cols] = k.to(self.k.dtype)
            self.v[rows, :, cols] = v.to(self.v.dtype)
            self.filled[rows, cols] = True
            return
        m = mask[..., None, None]
        self.k[rows, :, cols] = torch.where(m, k.to(self.k.dtype), self.k[rows, :, cols])
        self.v[rows, :, cols] = torch.where(m, v.to(self.v.dtype), self.v[rows, :, cols])
        self.filled[rows, cols] |= mask

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class LoopKVCache:
    """All KV stores of one batch; :meth:`begin` sets up the rows, columns and mask of the tokens computed next.

    The model calls :meth:`once` and :meth:`loop` per attention layer (the interface of :mod:`parcae.model.loop`)."""

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, policy: KVPolicy, adaptive: bool,
                 device=None, dtype=torch.float32) -> None:
        self.config, self.policy, self.B, self.capacity = config, policy, batch_size, capacity
        self._shape = (batch_size, config.kv_heads, capacity, config.head_dim)
        self._device, self._dtype = device, dtype
        P, R, C = config.n_prelude, config.n_recurrent, config.n_coda
        once = [*range(P), *range(P + R, P + R + C)] + ([] if config.looped else list(range(P, P + R)))
        self.stores = {index: self._new_store() for index in once}      # by block index: prelude, (GPT middle), coda
        self.slots: list[dict[int, _Store]] = [{} for _ in range(R if config.looped else 0)]
        # A token's last computed iteration per recurrent block, read where a slot lacks it (latest / ring).
        self.last = [self._new_store() for _ in self.slots] if adaptive and policy.kind != "full" else None
        self.present = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.all_rows = torch.arange(batch_size, device=device)
        self.step_rows: Optional[Tensor] = None  # rows of the batch in the current step (None: all)
        self.cols: Optional[Tensor] = None
        self.mask: Optional[Tensor] = None
        self.length = 0  # columns in use (max over rows)

    def _new_store(self) -> _Store:
        return _Store(*self._shape, self._device, self._dtype)

    # -- one step --------------------------------------------------------------------------------------------
    def begin(self, cols: Tensor, real: Tensor, rows: Optional[Tensor] = None, max_col: Optional[int] = None) -> None:
        """The next step computes rows ``rows`` of the batch (index tensor; None: all) with tokens at columns
        cols [rows, S]; real [rows, S] marks the ones that are not padding. ``max_col`` (cols.max(), known to the
        caller) spares a device read."""
        top = int(cols.max()) if max_col is None else max_col
        if top >= self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens per row; column {top} is beyond")
        self.step_rows, self.cols = rows, cols
        r = (self.all_rows if rows is None else rows)[:, None]
        self.present[r, cols] |= real
        self.length = max(self.length, top + 1)
        L = self.length
        key_cols = torch.arange(L, device=cols.device)
        present = self.present[:, :L] if rows is None else self.present[rows, :L]
        causal = key_cols[None, None, :] <= cols[..., None]                     # [b, S, L]
        mask = (causal & present[:, None, :]) | (key_cols[None, None, :] == cols[..., None])
        self.mask = mask[:, None]  # [b, 1, S, L]; a padding query sees only itself (no empty softmax rows)

    def once(self, index: int, rows: Optional[Tensor], write: Optional[Tensor]) -> "_View":
        """The view of prelude/coda block ``index`` (its place in the P+R+C stack) for rows ``rows`` of the step."""
        return _View(self, self.stores[index], None, rows, write)

    def loop(self, block: int, iteration: int, rows: Optional[Tensor], write: Optional[Tensor]) -> "_View":
        """The view of recurrent block ``block`` at iteration ``iteration`` (its slot under the policy)."""
        slot = self.policy.slot(iteration)
        store = self.slots[block].get(slot)
        if store is None:
            store = self.slots[block][slot] = self._new_store()
        return _View(self, store, self.last[block] if self.last is not None else None, rows, write)

    def release(self, row: int) -> None:
        """Forget every entry of one row, so the row can hold a new sequence from column 0 (continuous batching:
        a finished request's slot is reused by the next one's prefill)."""
        self.present[row] = False
        for store in (*self.stores.values(), *(s for slots in self.slots for s in slots.values()), *(self.last or [])):
            store.filled[row] = False
        used = self.present.any(0).nonzero()  # one device read per finished request: attention spans only these
        self.length = int(used.max()) + 1 if len(used) else 0

    # -- accounting ------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        stores = [*self.stores.values(), *(s for slots in self.slots for s in slots.values()), *(self.last or [])]
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

    def __init__(self, cache: LoopKVCache, store: _Store, fallback: Optional[_Store], rows: Optional[Tensor],
                 write: Optional[Tensor]) -> None:
        self.cache, self.store, self.fallback, self.rows, self.write = cache, store, fallback, rows, write

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c, sub = self.cache, self.rows
        batch_rows = c.step_rows if sub is None else (sub if c.step_rows is None else c.step_rows[sub])
        cols = c.cols if sub is None else c.cols[sub]
        mask = c.mask if sub is None else c.mask[sub]
        r = (c.all_rows if batch_rows is None else batch_rows)[:, None]
        self.store.write(r, cols, k, v, self.write)
        if self.fallback is not None:
            self.fallback.write(r, cols, k, v, self.write)
        L = c.length
        if batch_rows is None:
            take, cols_of = (lambda x: x[:, :, :L]), (lambda x: x[:, :L])
        else:
            take, cols_of = (lambda x: x[batch_rows, :, :L]), (lambda x: x[batch_rows, :L])
        keys, values = take(self.store.k), take(self.store.v)
        if self.fallback is not None:  # entries this slot lacks: the token's last computed iteration instead
            use = (cols_of(c.present) & ~cols_of(self.store.filled))[:, None, :, None]
            keys, values = torch.where(use, take(self.fallback.k), keys), torch.where(use, take(self.fallback.v), values)
        return keys, values, mask
