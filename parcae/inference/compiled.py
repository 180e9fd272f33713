"""The compiled decode step (``Engine(..., compile=True)``, ``--compile``): one token per row through
``torch.compile`` with static shapes (plain PyTorch).

    engine = Engine(model, loops=8, compile=True)          # the first step of a (batch, capacity) bucket compiles
    engine.generate([[bos, *ids]], max_new_tokens=64)       # same tokens as compile=False

What is compiled: the engine's per-token work — the prelude, the cached recurrent iterations, the coda and the
head (the model's own :meth:`parcae.model.LoopedLM.step`, with the engine's schedule; nothing here restates the
model's math) — as one graph per (row bucket, capacity bucket). Shapes never change from step to step:

* :class:`StaticKVCache` preallocates every iteration slot (``max_loops`` for full/latest, K for ring:K, one
  per prelude/coda block) and every attention reads the whole capacity (absent columns are masked), so
  :meth:`StaticKVCache.begin` does no host read and the keys' length is fixed;
* the batch is padded to a row bucket (1, 2, 4, 8, 16, ...; beyond 64 a multiple of 64) and the capacity to a
  power of two (at least 64; the model's context when it is larger), so a new request of another size reuses a
  graph; padded rows and rows not decoding are ``real`` = False: they write nothing, and their outputs are
  dropped;
* nothing inside the graph reads the host: the step's inputs are device tensors and the loop count is fixed.

What runs where: fixed depth (speculative drafts included) is one graph per token, and so is every exit rule under
the ``full`` KV policy (every token computes every iteration; the rule only picks its output). Under ``latest`` /
``ring:K`` an exited token should stop computing, which needs the host to know which rows still decide; a compiled
engine runs those steps one of three ways (``PARCAE_COMPILE_EXIT``):

* ``segments`` (the default on the CPU for models whose loop iteration costs at least 2 MFLOP a token,
  :func:`default_exit_mode`): the entry (prelude, h₀) is one graph, then each stretch of iterations up to
  the next check is a graph call on the rows whose token still decides, padded to a row bucket with rows that no
  longer compute (they store nothing), then the read-out. The host reads once per check which rows go on, as the
  eager engine does, and the batch shrinks 8 → 4 → 2 → 1 rows as tokens exit, so the compute an exit saves is saved
  up to the bucket's padding. A segment's iterations are numbered from a tensor (``StaticKVCache.first_iteration``:
  its KV slot and count are tensors), so one graph per (batch bucket, row bucket, segment length, last or not)
  serves every segment wherever it starts, and compaction never recompiles.
* ``graph`` (the default under CUDA graphs, where a launch-bound step costs about the same for fewer rows, and for
  smaller models on the CPU, where a segment's graph call costs more than the iterations it saves): one graph per
  token; a row whose token exited keeps running without storing anything (``_ExitSchedule(compact=False)``),
  so the outputs and cache entries are the eager engine's and the compute is that of ``max_loops``.
* ``eager``: the eager exit schedule on the static cache.

Prompt prefill (a chunk of many tokens, once per request) runs eagerly against the same static cache. Sampling is
drawn outside the graph (each row's generator).

On CUDA the graphs are captured with ``mode="reduce-overhead"`` (CUDA graphs); on the CPU inductor's default
mode. Start-up: compiled artifacts go to inductor's on-disk caches (FX graph cache, AOT autograd cache) under
``$TORCHINDUCTOR_CACHE_DIR``, which defaults here to ``~/.cache/parcae/inductor`` (:func:`cache_dir`), so a second
process compiles from cache. Each new graph logs "compiling ..." and its time on the ``parcae.compile`` logger
(stderr for the command line); a recompilation of a graph (a guard that failed) is logged as a warning.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import types
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

import torch
from torch import Tensor

from parcae.model.loop import Uniform, pick

from .cache import KVPolicy, LoopKVCache, _Store, _View

if TYPE_CHECKING:
    from .engine import Engine, _Forward

log = logging.getLogger("parcae.compile")

DEFAULT_CACHE_DIR = Path("~/.cache/parcae/inductor")
EXIT_MODES = ("segments", "graph", "eager")  # how a compiled engine runs an exit rule under latest / ring


def cache_dir() -> Path:
    """Where inductor keeps compiled artifacts across processes: ``$TORCHINDUCTOR_CACHE_DIR`` if the user set it,
    else ``~/.cache/parcae/inductor`` (set in the environment, so inductor's own caches use it). Importing
    ``torch._dynamo`` fills the variable with torch's default (a per-user folder in the temporary directory, which
    does not survive a reboot); that default counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(DEFAULT_CACHE_DIR.expanduser())
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


# A segment's graph call costs ~0.3 ms on the 2-core CPU whatever its rows (docs/benchmarks.md, "The compiled
# engine's exit-rule modes"): compaction pays when dropping an exited row saves more than that. Measured there: an
# iteration of 0.1 MFLOP a token (the demo model) ran "graph" 1.4-1.8x faster than "segments"; one of 28 MFLOP
# (the parcae-140m shape) ran "segments" 1.2x faster than "graph" and 1.06-1.15x faster than fixed depth.
SEGMENTS_MIN_FLOPS = 2e6


def default_exit_mode(config, device: torch.device) -> str:
    """How a compiled engine runs an exit rule under latest / ring unless ``PARCAE_COMPILE_EXIT`` says otherwise:
    ``graph`` under CUDA graphs (a launch-bound step costs about the same for fewer rows; not measured yet) and on
    the CPU for models whose loop iteration costs less than :data:`SEGMENTS_MIN_FLOPS` per token, ``segments``
    on the CPU above it."""
    from parcae.model.flops import inference_flops_per_token

    if torch.device(device).type == "cuda":
        return "graph"
    per_iteration = inference_flops_per_token(config, 2, 0) - inference_flops_per_token(config, 1, 0)
    return "segments" if per_iteration >= SEGMENTS_MIN_FLOPS else "graph"


def row_bucket(n: int) -> int:
    """Rows a batch of ``n`` is padded to: the next power of two up to 64, then the next multiple of 64."""
    if n < 1:
        raise ValueError(f"a batch needs at least one row, got {n}")
    return 1 << (n - 1).bit_length() if n <= 64 else -(-n // 64) * 64


def capacity_bucket(n: int, block_size: int) -> int:
    """Cache columns for ``n`` needed: the next power of two >= 64, capped at the model's context ``block_size``
    (when ``n`` itself fits)."""
    bucket = max(64, 1 << (max(n, 1) - 1).bit_length())
    return max(n, min(bucket, block_size))


class StaticKVCache(LoopKVCache):
    """A :class:`LoopKVCache` whose shapes never change: every iteration slot allocated up front (``max_loops``,
    or K under ring:K), attention over all ``capacity`` columns (the absent ones masked), no host read in
    :meth:`begin` or :meth:`release`. A step with fewer rows than the cache (prompt prefill of the unpadded batch)
    uses the cache's first rows."""

    def __init__(self, config, batch_size: int, capacity: int, policy: KVPolicy, adaptive: bool, max_loops: int,
                 device=None, dtype=torch.float32, stacked: bool = False) -> None:
        """``stacked``: each recurrent block's slots in one tensor (the compiled segments' tensor slots)."""
        super().__init__(config, batch_size, capacity, policy, adaptive, device, dtype)
        slots = min(policy.slots, max_loops) if policy.kind == "ring" else max_loops
        shape = (batch_size, config.kv_heads, capacity, config.head_dim)
        self.stores = {index: _StaticStore(shape, device, dtype) for index in self.stores}
        self.recurrent = [_StaticStore(shape, device, dtype, slots, stacked) for _ in self.recurrent]
        self.length = capacity
        self.key_cols = torch.arange(capacity, device=device)
        # a compiled segment's first iteration (a 0-d tensor; None outside segments): the model's iteration t of
        # the segment is iteration first_iteration + t, so one graph serves segments starting anywhere (its views
        # are LoopKVCache's per-row views, which index the stacked slots of the segments' caches)
        self.first_iteration: Optional[Tensor] = None

    def begin(self, cols: Tensor, real: Optional[Tensor], rows: Optional[Tensor] = None,
              max_col: Optional[int] = None) -> None:
        if max_col is not None and max_col >= self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens per row; column {max_col} is beyond")
        if rows is None and cols.shape[0] != self.B:
            rows = self.all_rows[: cols.shape[0]]
        self.step_rows, self.cols = rows, cols
        r = (self.all_rows if rows is None else rows)[:, None]
        self.step_index = r  # (LoopKVCache.begin's: the eager views index the stores with it)
        if real is None:  # every token real (LoopKVCache.begin's decode-step case)
            self.present[r, cols] = True
        else:
            self.present[r, cols] |= real
        present = self.present if rows is None else self.present[rows]
        key_cols = self.key_cols
        causal = key_cols[None, None, :] <= cols[..., None]                      # [b, S, capacity]
        mask = (causal & present[:, None, :]) | (key_cols[None, None, :] == cols[..., None])
        self.mask = mask[:, None]

    def once(self, index: int, rows: Optional[Tensor], write: Optional[Tensor]) -> _View:
        return _StaticView(self, self.stores[index], 0, None, False, rows, write)

    def loop(self, block: int, iteration: int, rows: Optional[Tensor], write: Optional[Tensor]) -> _View:
        if self.first_iteration is not None:  # a segment: every row of the view at the iteration of a tensor
            iterations = (self.first_iteration + iteration).expand((self.cols if rows is None else rows).shape[0])
            # the per-row view of LoopKVCache (slot, count and fallback per row) over the stacked slots, all of
            # which exist (top: the store's last slot)
            return LoopKVCache.loop_rows(self, block, iterations, rows, write, top=self.recurrent[block].slots - 1)
        view = super().loop(block, iteration, rows, write)
        return _StaticView(self, view.store, view.slot, view.count, view.fallback, rows, write)

    def loop_rows(self, *args, **kwargs):
        raise NotImplementedError("depth-level batching does not run on the static KV cache of a compiled engine "
                                  "(compiled lanes decode token-level steps)")

    def release(self, row: int) -> None:
        self.present[row] = False
        if self.computed is not None:
            self.computed[row] = 0

    def reset(self) -> None:
        """Forget every row (the cache is reused by the next request)."""
        self.present.zero_()
        if self.computed is not None:
            self.computed.zero_()


class _StaticStore(_Store):
    """A store of one tensor per slot (keys and values), all allocated up front. Slots of one tensor would be views
    of one base, and a compiled graph that writes into one view copies the whole base: separate tensors are
    written in place."""

    def __init__(self, shape: tuple, device, dtype, slots: int = 1, stacked: bool = False) -> None:
        """``stacked``: the slots are views of one tensor [slots, ...] (``k_all``, ``v_all``), which the compiled
        segments index with a tensor slot (one scatter, one gather); the other graphs write into one slot's
        tensor and take separate ones."""
        self.shape, self.device, self.dtype = shape, device, dtype
        self.k_all = self.v_all = None
        if stacked:
            self.k_all = torch.zeros(slots, *shape, device=device, dtype=dtype)
            self.v_all = torch.zeros_like(self.k_all)
            self.ks, self.vs = list(self.k_all), list(self.v_all)
        else:
            self.ks = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(slots)]
            self.vs = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(slots)]

    def ensure(self, slot: int) -> None:
        if slot >= len(self.ks):
            raise ValueError(f"iteration slot {slot} is beyond the {len(self.ks)} slots of a static KV cache")

    def write(self, slot: int, rows: Tensor, cols: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> None:
        K, V = self.ks[slot], self.vs[slot]
        if mask is not None:
            m = mask[..., None, None]
            k, v = torch.where(m, k.to(K.dtype), K[rows, :, cols]), torch.where(m, v.to(V.dtype), V[rows, :, cols])
        K[rows, :, cols], V[rows, :, cols] = k.to(K.dtype), v.to(V.dtype)

    @property
    def k(self) -> Tensor:   # the stacked slots [slots, B, kv_heads, capacity, head_dim] (a copy unless stacked)
        return self.k_all if self.k_all is not None else torch.stack(self.ks)

    @property
    def v(self) -> Tensor:
        return self.v_all if self.v_all is not None else torch.stack(self.vs)

    @property
    def slots(self) -> int:
        return len(self.ks)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[Tensor]:
        return [self.k_all, self.v_all] if self.k_all is not None else [*self.ks, *self.vs]


class _StaticView(_View):
    """A view that reads its own slot's tensor (no stacked copy) when no fallback is needed."""

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self.fallback and not torch.compiler.is_compiling():  # latest / ring, the eager exit schedule
            return super().update(k, v)
        c = self.cache
        batch_rows, cols, mask, r = self.step()
        self.store.write(self.slot, r, cols, k, v, self.write)
        keys, values = self.store.ks[self.slot], self.store.vs[self.slot]
        if batch_rows is not None:
            keys, values = keys[batch_rows], values[batch_rows]
        if not self.fallback:
            return keys, values, mask
        if self.count is not None:  # the count of LoopKVCache's fallback, then its read as a chain of selects
            self.record_count(r, cols, self.count)
        computed = c.computed if batch_rows is None else c.computed[batch_rows]
        pick = (computed - 1).clamp(0, self.slot)[:, None, :, None]                      # [b, 1, capacity, 1]
        for s in range(self.slot):
            older_k, older_v = self.store.ks[s], self.store.vs[s]
            if batch_rows is not None:
                older_k, older_v = older_k[batch_rows], older_v[batch_rows]
            keys, values = torch.where(pick == s, older_k, keys), torch.where(pick == s, older_v, values)
        return keys, values, mask


class _Segment:
    """The schedule of one compiled segment of an exit-rule step: ``n`` iterations of the rows ``rows`` (an index
    of the batch, padded to a row bucket with rows that no longer compute, which store nothing), then the exit
    check of ``exit`` (an :class:`parcae.inference.engine._ExitSchedule`). Iterations are numbered from the cache's
    ``first_iteration`` tensor, so segments of the same length share one graph wherever they start."""

    finished = False
    first = 0

    def __init__(self, exit, rows: Tensor, n: int, first_iteration: Tensor, last: bool, consecutive: bool) -> None:
        self.exit, self.active, self.iterations, self.first_iteration = exit, rows, n, first_iteration
        self.last, self.consecutive = last, consecutive

    def rows(self, t: int) -> Tensor:
        return self.active

    def writes(self, t: int) -> Tensor:
        return pick(self.exit.deciding, self.active)  # a row whose token exited stores nothing

    def done(self, t: int, h_before: Tensor, h: Tensor, rows: Tensor, read_out) -> None:
        if t + 1 == self.iterations:
            self.exit.check(self.first_iteration + self.iterations, h_before if self.consecutive else None, h, rows,
                            read_out, self.last)

    def output(self, h: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        return h, None


class CompiledStep:
    """The engine's compiled per-token forward (see the module docstring); built by ``Engine(..., compile=True)``."""

    def __init__(self, engine: "Engine") -> None:
        import torch._dynamo  # noqa: F401  (imported here: only a compiled engine pays for it)

        cache_dir()
        _log_recompiles()
        _show_progress()
        self.engine = engine
        self.cuda = engine.device.type == "cuda"
        if not self.cuda:
            _reuse_vector_isa_probe()
        self.mode = "reduce-overhead" if self.cuda else None
        # latest / ring with an exit rule (module docstring): "segments" (compaction), "graph" (one graph, exited
        # rows keep running) or "eager"
        self.exit_mode = os.environ.get("PARCAE_COMPILE_EXIT", default_exit_mode(engine.config, engine.device))
        if self.exit_mode not in EXIT_MODES:
            raise ValueError(f"PARCAE_COMPILE_EXIT={self.exit_mode!r}: choose one of {', '.join(EXIT_MODES)}")
        self.segments = engine.adaptive and engine.policy.kind != "full" and self.exit_mode == "segments"
        self._graphs: dict[tuple, object] = {}   # (kind, rows, capacity, loops, first) -> compiled function
        self._caches: list[StaticKVCache] = []   # reused when nobody else holds them (static addresses)
        self._iterations: dict[int, Tensor] = {}
        # (row, iteration) pairs the recurrent blocks of the graphs computed, padded rows included (host-side: the
        # compute an exit rule's compaction saves shows here, while Engine.iterations_run counts tokens' depths)
        self.row_iterations = 0

    # -- caches ----------------------------------------------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int) -> StaticKVCache:
        """A static cache of ``row_bucket(batch_size)`` rows and ``capacity_bucket(capacity)`` columns; one that
        no caller holds any more is reused (its addresses stay, so CUDA graphs replay without re-recording)."""
        e = self.engine
        B, C = row_bucket(batch_size), capacity_bucket(capacity, e.config.block_size)
        for cache in self._caches:
            # held only by this list, the loop variable and getrefcount's argument: free to reuse
            if cache.B == B and cache.capacity == C and sys.getrefcount(cache) <= 3:
                cache.reset()
                return cache
        dtype = next(e.model.parameters()).dtype
        cache = StaticKVCache(e.config, B, C, e.policy, e.adaptive, e.max_loops, e.device, dtype,
                              stacked=self.segments)
        if self.cuda:
            for t in [cache.present, *(t for s in [*cache.stores.values(), *cache.recurrent] for t in s.tensors())] + \
                     ([cache.computed] if cache.computed is not None else []):
                torch._dynamo.mark_static_address(t)
        self._caches.append(cache)
        return cache

    # -- the step --------------------------------------------------------------------------------------------
    def handles(self, cache, tokens: Tensor, adaptive: bool, need_logits: bool) -> bool:
        """Whether this forward goes through a graph: one token per row, a static cache, logits wanted, and a
        depth decided without host reads (fixed depth, or an exit rule under the full KV policy)."""
        e = self.engine
        return (isinstance(cache, StaticKVCache) and tokens.shape[1] == 1 and need_logits and e.config.looped
                and (not adaptive or e.policy.kind == "full" or self.exit_mode != "eager"))

    def forward(self, cache: StaticKVCache, tokens: Tensor, cols: Tensor, positions: Tensor, real: Tensor,
                sequences: Tensor, adaptive: bool, initial_state: Optional[Tensor], rows: Optional[Sequence[int]],
                max_col: Optional[int], loops: Optional[int], first_loop: int) -> "_Forward":
        """:meth:`Engine.forward` of one token per row through the compiled graph of the cache's bucket."""
        from .engine import _Forward

        e = self.engine
        B, Bp = tokens.shape[0], cache.B
        if max_col is not None and max_col >= cache.capacity:
            raise ValueError(f"the KV cache holds {cache.capacity} tokens per row; column {max_col} is beyond")
        if rows is not None and len(rows) < B:
            mask = torch.zeros(B, 1, dtype=torch.bool)
            mask[list(rows)] = True
            real = real & mask.to(real.device)
        if Bp > B:  # padded rows: not real, so they write nothing
            pad = Bp - B
            tokens, cols, positions, real, sequences = (
                torch.cat([x, x.new_zeros((pad, *x.shape[1:]))]) for x in (tokens, cols, positions, real, sequences))
            if initial_state is not None:
                initial_state = torch.cat([initial_state, initial_state.new_zeros((pad, *initial_state.shape[1:]))])
        if adaptive and self.segments:
            logits, depth, state = self._segments(cache, tokens, cols, positions, real, sequences, initial_state)
            return _Forward(logits[:B], depth[:B], state[:B])
        if adaptive:
            key = ("exit", Bp, cache.capacity, initial_state is not None)
        else:
            n = (loops or e.prefill_loops)
            key = ("fixed", Bp, cache.capacity, n, first_loop, initial_state is not None)
        fn = self._graph(key, self._compile)
        if self.cuda:  # a new CUDA-graph step: the previous replay's outputs are no longer read in place
            torch.compiler.cudagraph_mark_step_begin()
        logits, depth, state = fn(cache, tokens, cols, positions, real, sequences, initial_state)
        self.row_iterations += Bp * (e.max_loops if adaptive else key[3] - first_loop)
        if self.cuda:  # the next replay overwrites the graph's outputs; callers may keep them (StepEvent.logits)
            logits, depth, state = logits.clone(), depth.clone(), None if state is None else state.clone()
        if not adaptive:
            n_real = real.sum()
            e._iterations += n_real * (key[3] - first_loop)
            e._readouts += n_real
        if Bp > B:
            logits, depth, state = logits[:B], depth[:B], state[:B]
        return _Forward(logits, depth, state)

    def _graph(self, key: tuple, build):
        """The compiled function of ``key`` (built by ``build(key)`` and compiled on its first call)."""
        fn = self._graphs.get(key)
        if fn is None:
            fn = self._graphs[key] = _Timed(self._torch_compile(build(key), key), key)
        return fn

    def _segments(self, cache: StaticKVCache, tokens: Tensor, cols: Tensor, positions: Tensor, real: Tensor,
                  sequences: Tensor, initial_state: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """An exit-rule step under latest / ring with compaction: the entry (prelude, h₀) in one graph, then one
        graph per segment of iterations between checks, on the rows still deciding padded to a row bucket (the
        host reads once per check which rows those are, as the eager engine does), then the read-out. Segments
        of one length and bucket share a graph whatever their first iteration, so a step compiles at most a
        graph per (segment length, row bucket) and never recompiles."""
        from .engine import _ExitSchedule

        e, Bp, C = self.engine, cache.B, cache.capacity
        warm = initial_state is not None
        h, drive, rope, ve = self._graph(("enter", Bp, C, warm), self._enter)(
            cache, tokens, cols, positions, real, sequences, initial_state)
        exit = _ExitSchedule(e, real, compact=False)
        exit.start(h.clone(), h.clone())  # (distinct tensors: dynamo guards on which inputs alias; later none do)
        rows, t = cache.all_rows, 0
        while True:
            n = min(e.min_loops if t == 0 else e.exit_every, e.max_loops - t)
            last = t + n == e.max_loops
            # the state rules compare with the state before the check's iteration when the previous check (or h₀,
            # before the first) was that state
            consecutive = e.exit_every == 1 and (t > 0 or e.min_loops == 1)
            segment = self._graph(("segment", len(rows), C, n, last, consecutive, Bp), self._segment)
            h = segment(cache, exit, h, drive, rope, ve, rows, self._iteration(t))
            self.row_iterations += len(rows) * n
            t += n
            if last:
                break
            still = exit.deciding.any(-1).tolist()  # the one read of a check: the rows whose token still decides
            keep = [b for b in range(Bp) if still[b]]
            if not keep:
                break
            if len(keep) < len(rows):  # compaction: the deciding rows, padded with rows that no longer compute
                idle = [b for b in range(Bp) if not still[b]]
                rows = torch.tensor(keep + idle[: row_bucket(len(keep)) - len(keep)], device=real.device)
        if exit.logits_out is not None:  # an output rule read every token out at its exit check
            logits = exit.logits_out
        else:
            logits = self._graph(("readout", Bp, C), self._readout)(cache, exit.h_out, rope, ve, real)
            e._readouts += real.sum()
        exit.output(h)  # counts each token's iterations
        return torch.where(real[..., None], logits, 0.0), torch.where(real, exit.depth, 0), exit.h_out

    def _iteration(self, t: int) -> Tensor:
        """Iteration t as a 0-d tensor on the engine's device (one per t, made once)."""
        found = self._iterations.get(t)
        if found is None:
            found = self._iterations[t] = torch.tensor(t, device=self.engine.device)
        return found

    def _enter(self, key: tuple):
        model, seed = self.engine.model, self.engine.seed

        def enter(cache, tokens, cols, positions, real, sequences, initial_state):
            cache.begin(cols, real)
            x, rope, value_embeddings = model.prelude_step(tokens, positions, cache, real)
            e, h = model.loop_input(x, initial_state, seed, sequences, positions)
            return h, model.injection.input_term(e), rope, value_embeddings
        return enter

    def _segment(self, key: tuple):
        model, (_, _, _, n, last, consecutive, _) = self.engine.model, key

        def segment(cache, exit, h, drive, rope, value_embeddings, rows, first_iteration):
            cache.first_iteration = first_iteration
            h = model._iterate(h, drive, _Segment(exit, rows, n, first_iteration, last, consecutive), rope,
                               value_embeddings, cache)
            cache.first_iteration = None
            return h
        return segment

    def _readout(self, key: tuple):
        model = self.engine.model

        def readout(cache, h, rope, value_embeddings, real):
            return model.read_out(h, rope, value_embeddings, cache, None, real)
        return readout

    def _compile(self, key: tuple):
        from .engine import _ExitSchedule

        e = self.engine
        model, seed, fixed = e.model, e.seed, key[0] == "fixed"

        def step(cache, tokens, cols, positions, real, sequences, initial_state):
            cache.begin(cols, real)
            schedule = Uniform(key[3], real, key[4]) if fixed else _ExitSchedule(e, real, compact=False)
            out = model.step(tokens, schedule=schedule, positions=positions, cache=cache, real=real,
                             initial_state=initial_state, state_seed=seed, sequences=sequences)
            if not fixed and schedule.logits_out is None:  # (fixed depth counts its read-outs in forward)
                e._readouts += real.sum()
            depth = torch.where(real, schedule.iterations if fixed else schedule.depth, 0)
            return torch.where(real[..., None], out.logits, 0.0), depth, out.state

        return step

    def _torch_compile(self, fn, key: tuple):
        # PARCAE_COMPILE_BACKEND (default inductor) lets the tests check the tracing (static shapes, buckets, no
        # graph break) with "aot_eager", which skips inductor's code generation
        backend = os.environ.get("PARCAE_COMPILE_BACKEND", "inductor")
        fn = _own_code(fn, "_".join(map(str, key)))
        if backend != "inductor":
            return torch.compile(fn, backend=backend, dynamic=False)
        if self.cuda:
            # (a segment's outputs feed the next replay of the same graph, which CUDA graphs would overwrite in
            # place: the segments' graphs are compiled without capture)
            return torch.compile(fn, mode=self.mode if key[0] in ("fixed", "exit") else None, dynamic=False)
        # CPU: the graph's wrapper in C++ instead of Python (~20 % more tokens/s at batch 1 on the demo model)
        return torch.compile(fn, options={"cpp_wrapper": True}, dynamic=False)


def _reuse_vector_isa_probe() -> None:
    """Inductor checks each vector instruction set the CPU reports (AVX2, AVX-512, AMX, ...) by building a test
    library and loading it in a child Python, in every process: ~1.4 s of a compiled start on the 2-core VM. Once
    every instruction set the CPU reports has passed, a marker in the cache folder (keyed by torch, the interpreter
    and the CPU's flags) records it, and this and every later process set inductor's own switch for a checked ISA
    (``torch._inductor.config.cpp.vec_isa_ok``), which skips the basic checks (the checks of AVX-512's and AMX's
    extensions still run). A failed or partial check writes nothing and leaves the switch alone, so such a machine
    keeps checking. The switch is part of inductor's cache keys: it is set in the first process too, so the graphs
    it compiles are the ones later processes find. Delete the cache folder to check again."""
    import hashlib
    import platform

    from torch._inductor import config, cpu_vec_isa

    if config.cpp.vec_isa_ok is not None or platform.machine() not in ("x86_64", "AMD64"):
        return
    flags = cpu_vec_isa.x86_isa_checker()
    key = hashlib.sha256(repr((torch.__version__, sys.executable, sorted(flags))).encode()).hexdigest()[:16]
    marker = cache_dir() / f"vector-isa-{key}.ok"
    if not marker.exists():
        reported = [isa for isa in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(isa).split())]
        if not reported or cpu_vec_isa.valid_vec_isa_list() != reported:  # (the check: each built and loaded)
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"every vector ISA the CPU reports built and loaded: {', '.join(map(str, reported))}\n")
    config.cpp.vec_isa_ok = True


def _own_code(fn, tag: str):
    """``fn`` with a code object of its own: dynamo keeps compiled graphs per code object, so each bucket's graph
    has its own cache entry and a new bucket is a first compile, never a recompile of another bucket's graph (nor
    does it count toward dynamo's recompile limit)."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}")
    return types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)


class _Timed:
    """A compiled function whose first call (the compilation) is logged with its time."""

    def __init__(self, fn, key: tuple) -> None:
        self.fn, self.key, self.first = fn, key, True

    def __call__(self, *args):
        if not self.first:
            return self.fn(*args)
        kind, rows, columns = self.key[:3]
        n = self.key[3] if kind in ("fixed", "segment") else 0
        part = {"fixed": f"fixed step, {n} loops", "exit": "exit-rule step", "enter": "exit-rule entry",
                "segment": f"exit-rule segment of {n} iteration{'s' * (n != 1)}",
                "readout": "exit-rule read-out"}[kind]
        what = f"{part}, {rows} rows, {columns} cache columns"
        log.info("compiling the decode step (%s); cache %s", what, cache_dir())
        start = time.perf_counter()
        out = self.fn(*args)
        log.info("compiled the decode step (%s) in %.1f s", what, time.perf_counter() - start)
        self.first = False
        return out


def _show_progress() -> None:
    """Compile progress on stderr when nobody configured logging (the command line): a line per graph."""
    if not log.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[compile] %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


_recompile_hook_installed = False
_recompiled = 0  # recompilations seen by the hook in this process


def _log_recompiles() -> None:
    """Route dynamo's recompilation reasons to our logger as warnings (a recompile is never silent)."""
    global _recompile_hook_installed
    if _recompile_hook_installed:
        return
    _recompile_hook_installed = True
    torch._logging.set_logs(recompiles=True)
    source = logging.getLogger("torch._dynamo")  # the recompiles artifact is logged here (guards.py)

    class _Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            global _recompiled
            message = record.getMessage()
            if message.lstrip().startswith("Recompiling"):
                _recompiled += 1
                lines = [line.strip() for line in message.strip().splitlines()]
                log.warning("torch recompiled a graph: %s", " | ".join(lines[:4])[:800])

    source.addHandler(_Forward())


def recompiles() -> int:
    """Recompilations logged in this process since the first compiled engine (a graph whose guards failed and
    was compiled again)."""
    return _recompiled
