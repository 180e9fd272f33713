"""KV cache of a looped model: one store per prelude/coda block, and per (iteration slot, recurrent block).

The cache is laid out in *columns*: column c of row b holds the c-th token written for that row (prompt tokens,
then generated ones). Padding columns are never marked present, so no query attends to them; a row's
position (for RoPE and the initial state) counts only its real tokens, so left- and right-padded prompts see
exactly what they would see alone.

A token that exits the loop early never computes the keys/values of its later iterations. Which entry a later
token reads instead is the KV policy (the idea comes from Huginn's cache, seal-rg/recurrent-pretraining,
``recpre/raven_modeling_minimal.py``, ``HuginnDynamicCache``, whose "steps" number every recurrent *block* call,
so Huginn's counts are R times ours):

* ``full``    every token runs all ``max_loops`` iterations (only its output is taken at the exit), so every entry
              exists: the exact reference, no compute saved. Huginn's ``full``.
* ``latest``  a token stops computing at its exit; for an iteration it never ran, later tokens read its last
              computed iteration of the same recurrent block. Huginn's ``latest-m4`` (m4: its R = 4 blocks).
* ``ring:K``  K slots per recurrent block, shared by iterations t ≡ s (mod K); a slot a token never reached reads
              its last computed iteration. Memory is at most K·R entries per token whatever the depth; exact for
              depths <= K. Huginn's ``compress-s{K·R}`` (its slot count is in block calls, not iterations).

Memory: each recurrent block keeps one [slots, B, kv_heads, capacity, head_dim] tensor that grows a slot when a
token first reaches a new iteration (``latest``: the deepest iteration any token ran; ``ring:K``: at most K), so
no policy allocates a slot nobody used, and ``latest`` never holds more than ``full``. The last computed entry a
fallback needs is already in the token's own slot: the read for iteration slot s takes slot min(s, n − 1) of a
token that ran n iterations, one gather.

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

    def slot(self, iteration: int | Tensor) -> int | Tensor:
        """The slot of an iteration (or of a tensor of them, one per row)."""
        return iteration % self.slots if self.kind == "ring" else iteration

    def __str__(self) -> str:
        return f"ring:{self.slots}" if self.kind == "ring" else self.kind


class _Store:
    """Keys and values [slots, B, kv_heads, capacity, head_dim]; a prelude/coda block has one slot, a recurrent
    block one per iteration slot, added on first use."""

    def __init__(self, shape: tuple, device, dtype, slots: int = 1) -> None:
        self.shape, self.device, self.dtype = shape, device, dtype
        self.k = torch.zeros(slots, *shape, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)

    def ensure(self, slot: int) -> None:
        missing = slot + 1 - self.k.shape[0]
        if missing > 0:  # (ordinary tensors even inside the engine's inference mode: writable by any later caller)
            with torch.inference_mode(False):
                extra = torch.zeros(missing, *self.shape, device=self.device, dtype=self.dtype)
                self.k, self.v = torch.cat([self.k, extra]), torch.cat([self.v, extra])

    def write(self, slot: int, rows: Tensor, cols: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> None:
        """k, v [n, S, kv_heads, hd] of rows rows [n, 1] into columns cols [n, S] where mask [n, S] (None: all)."""
        self.ensure(slot)
        if k.dtype != self.dtype:
            k, v = k.to(self.dtype), v.to(self.dtype)
        if mask is None:  # every token stores (a decode step): one write per tensor, nothing read back
            self.k[slot, rows, :, cols], self.v[slot, rows, :, cols] = k, v
            return
        K, V = self.k[slot], self.v[slot]
        m = mask[..., None, None]
        K[rows, :, cols] = torch.where(m, k, K[rows, :, cols])
        V[rows, :, cols] = torch.where(m, v, V[rows, :, cols])

    @property
    def slots(self) -> int:
        return self.k.shape[0]

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2


class LoopKVCache:
    """All KV stores of one batch; :meth:`begin` sets up the rows, columns and mask of the tokens computed next.

    The model calls :meth:`once` and :meth:`loop` per attention layer (the interface of :mod:`parcae.model.loop`)."""

    def __init__(self, config: ModelConfig, batch_size: int, capacity: int, policy: KVPolicy, adaptive: bool,
                 device=None, dtype=torch.float32) -> None:
        self.config, self.policy, self.B, self.capacity = config, policy, batch_size, capacity
        shape = (batch_size, config.kv_heads, capacity, config.head_dim)
        P, R, C = config.n_prelude, config.n_recurrent, config.n_coda
        once = [*range(P), *range(P + R, P + R + C)] + ([] if config.looped else list(range(P, P + R)))
        self.stores = {index: _Store(shape, device, dtype) for index in once}   # by block index
        self.recurrent = [_Store(shape, device, dtype, slots=0) for _ in range(R if config.looped else 0)]
        # Iterations each token computed, where an exited token's later iterations are read from its last one.
        self.computed = torch.zeros(batch_size, capacity, dtype=torch.long, device=device) \
            if adaptive and policy.kind != "full" else None
        self.present = torch.zeros(batch_size, capacity, dtype=torch.bool, device=device)
        self.all_rows = torch.arange(batch_size, device=device)
        self.step_rows: Optional[Tensor] = None  # rows of the batch in the current step (None: all)
        self.cols: Optional[Tensor] = None
        self.step_index: Optional[Tensor] = None  # [b, 1] the step's rows (all_rows or step_rows) as an index
        self.mask: Optional[Tensor] = None
        self.length = 0  # columns in use (max over rows)

    # -- one step --------------------------------------------------------------------------------------------
    def begin(self, cols: Tensor, real: Optional[Tensor], rows: Optional[Tensor] = None,
              max_col: Optional[int] = None) -> None:
        """The next step computes rows ``rows`` of the batch (index tensor; None: all) with tokens at columns
        cols [rows, S]; real [rows, S] marks the ones that are not padding (None: every one is real, as in a
        decode step, known on the host). ``max_col`` (cols.max(), known to the caller) spares a device read."""
        top = int(cols.max()) if max_col is None else max_col
        if top >= self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens per row; column {top} is beyond")
        self.step_rows, self.cols = rows, cols
        r = (self.all_rows if rows is None else rows)[:, None]
        self.step_index = r  # [b, 1], the rows' places in the stores (every view of the step indexes with it)
        if real is None:
            self.present[r, cols] = True
        else:
            self.present[r, cols] |= real
        self.length = max(self.length, top + 1)
        L = self.length
        key_cols = torch.arange(L, device=cols.device)[None, None, :]
        present = self.present[:, None, :L] if rows is None else self.present[rows, None, :L]
        mask = (key_cols <= cols[..., None]) & present                          # causal, [b, S, L]
        if real is not None:  # a padding query sees only itself (no empty softmax rows)
            mask |= key_cols == cols[..., None]
        self.mask = mask[:, None]  # [b, 1, S, L]

    def once(self, index: int, rows: Optional[Tensor], write: Optional[Tensor]) -> "_View":
        """The view of prelude/coda block ``index`` (its place in the P+R+C stack) for rows ``rows`` of the step."""
        return _View(self, self.stores[index], 0, None, False, rows, write)

    def loop(self, block: int, iteration: int, rows: Optional[Tensor], write: Optional[Tensor]) -> "_View":
        """The view of recurrent block ``block`` at iteration ``iteration`` (its slot under the policy)."""
        fallback = self.computed is not None
        count = iteration + 1 if fallback and block == 0 else None  # the first block of an iteration counts it
        return _View(self, self.recurrent[block], self.policy.slot(iteration), count, fallback, rows, write)

    def loop_rows(self, block: int, iterations: Tensor, rows: Optional[Tensor], write: Optional[Tensor],
                  top: Optional[int] = None) -> "_RowsView":
        """The view of recurrent block ``block`` when each row of the step is at its own iteration: ``iterations``
        [rows] (depth-level batching, :mod:`parcae.inference.depth_batching`). Row b stores into and reads the
        slot of its iteration t_b under the policy, a token that never ran it read from slot min(slot_b,
        computed − 1) (the fallback of :meth:`loop`, per row). ``top`` (the largest iteration, known to the
        caller) spares a device read."""
        fallback = self.computed is not None
        slots = self.policy.slot(iterations)
        deepest = int(iterations.max()) if top is None else top
        top_slot = min(deepest, self.policy.slots - 1) if self.policy.kind == "ring" else deepest
        return _RowsView(self, self.recurrent[block], slots, top_slot,
                         iterations + 1 if fallback and block == 0 else None, fallback, rows, write)

    def release(self, row: int) -> None:
        """Forget every entry of one row, so the row can hold a new sequence from column 0 (continuous batching:
        a finished request's slot is reused by the next one's prefill)."""
        self.present[row] = False  # nothing attends to an absent column; a new token there overwrites its entries
        if self.computed is not None:
            self.computed[row] = 0
        used = self.present.any(0).nonzero()  # one device read per finished request: attention spans only these
        self.length = int(used.max()) + 1 if len(used) else 0

    def forget(self, row: int, from_col: int) -> None:
        """Drop one row's columns from ``from_col`` on (speculative decoding's rejected drafts); they are written anew."""
        self.present[row, from_col:] = False
        if self.computed is not None:
            self.computed[row, from_col:] = 0

    # -- accounting ------------------------------------------------------------------------------------------
    @property
    def slots(self) -> list[int]:
        """Iteration slots allocated per recurrent block."""
        return [s.slots for s in self.recurrent]

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in [*self.stores.values(), *self.recurrent])

    def entries_per_token_by_shape(self, deepest: int) -> int:
        """KV entries (key + value vectors of one block) per token slot that the model's shape and the policy call
        for when the deepest token ran ``deepest`` iterations."""
        c = self.config
        if not c.looped:
            return c.n_layers
        per_loop = min(deepest, self.policy.slots) if self.policy.kind == "ring" else deepest
        return c.n_prelude + c.n_coda + per_loop * c.n_recurrent


class _View:
    """What one attention layer sees: store the new keys/values (where allowed), return all readable ones."""

    def __init__(self, cache: LoopKVCache, store: _Store, slot: int, count: Optional[int], fallback: bool,
                 rows: Optional[Tensor], write: Optional[Tensor]) -> None:
        self.cache, self.store, self.slot, self.count, self.rows, self.write = cache, store, slot, count, rows, write
        self.fallback = fallback  # a token that never ran this slot's iteration is read from its last one

    def step(self) -> tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
        """This view's rows of the step: (their rows in the batch, None for all; their columns; their mask; their
        places in the stores as an index [b, 1])."""
        c, sub = self.cache, self.rows
        if sub is None:  # the step's rows, indexed once by begin
            return c.step_rows, c.cols, c.mask, c.step_index
        batch_rows = sub if c.step_rows is None else c.step_rows[sub]
        return batch_rows, c.cols[sub], c.mask[sub], batch_rows[:, None]

    def record_count(self, r: Tensor, cols: Tensor, count: int | Tensor) -> None:
        """Mark the tokens written here as having computed ``count`` iterations (an int, or one per row [b, 1])."""
        c = self.cache
        counted = c.computed[r, cols]
        if self.write is not None:
            c.computed[r, cols] = torch.where(self.write, count, counted)
        elif isinstance(count, int):
            c.computed[r, cols] = counted.fill_(count)
        else:
            c.computed[r, cols] = count.expand_as(counted)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c, slot = self.cache, self.slot
        batch_rows, cols, mask, r = self.step()
        self.store.write(slot, r, cols, k, v, self.write)
        if self.count is not None:  # iterations computed by the tokens written here
            self.record_count(r, cols, self.count)
        L = c.length
        if not self.fallback:
            keys, values = self.store.k[slot, :, :, :L], self.store.v[slot, :, :, :L]
            if batch_rows is not None:
                keys, values = keys[batch_rows], values[batch_rows]
            return keys, values, mask
        # A token that ran n iterations is read from slot min(slot, n − 1): its own entry, or its last one.
        computed = c.computed[:, :L] if batch_rows is None else c.computed[batch_rows, :L]
        pick = (computed - 1).clamp(0, slot)[None, :, None, :, None]                        # [1, b, 1, L, 1]
        keys, values = self.store.k[: slot + 1, :, :, :L], self.store.v[: slot + 1, :, :, :L]
        if batch_rows is not None:
            keys, values = keys[:, batch_rows], values[:, batch_rows]
        index = pick.expand(1, *keys.shape[1:])
        return keys.gather(0, index)[0], values.gather(0, index)[0], mask


class _RowsView(_View):
    """A recurrent block's view whose rows are each at their own iteration slot (``slots`` [rows]); ``top`` is
    the largest slot (allocated on first use, like :meth:`_Store.ensure`), ``count`` [rows] the iterations
    computed by a row's written tokens (first block only)."""

    def __init__(self, cache: LoopKVCache, store: _Store, slots: Tensor, top: int, count: Optional[Tensor],
                 fallback: bool, rows: Optional[Tensor], write: Optional[Tensor]) -> None:
        super().__init__(cache, store, 0, None, fallback, rows, write)
        self.slots, self.top, self.counts = slots, top, count

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        c, st = self.cache, self.store
        _, cols, mask, r = self.step()
        s = self.slots[:, None]
        st.ensure(self.top)
        if self.write is None:
            st.k[s, r, :, cols], st.v[s, r, :, cols] = k.to(st.dtype), v.to(st.dtype)
        else:
            m = self.write[..., None, None]
            st.k[s, r, :, cols] = torch.where(m, k.to(st.dtype), st.k[s, r, :, cols])
            st.v[s, r, :, cols] = torch.where(m, v.to(st.dtype), st.v[s, r, :, cols])
        if self.counts is not None:
            self.record_count(r, cols, self.counts[:, None])
        L = c.length
        rows_all = r[:, 0]
        if not self.fallback:
            return st.k[self.slots, rows_all, :, :L], st.v[self.slots, rows_all, :, :L], mask
        # row b's token that ran n iterations is read from slot min(slot_b, n − 1)
        computed = c.computed[rows_all, :L]
        pick = torch.minimum((computed - 1).clamp(min=0), self.slots[:, None])               # [b, L]
        key_cols = torch.arange(L, device=pick.device)[None]
        return (st.k[pick, r, :, key_cols].transpose(1, 2), st.v[pick, r, :, key_cols].transpose(1, 2), mask)
