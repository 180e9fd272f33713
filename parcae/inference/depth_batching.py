"""Depth-level (loop-level) continuous batching: tokens at different loop iterations share one recurrent call.

A token-level step runs as many iterations as its deepest token: rows whose token exited early wait for it. Here
the unit of scheduling is one loop iteration (Continuous Depth Batching, arXiv 2608.09444; implemented for Ouro in
ThinkFlowLab/vllm-rlt). Every request holds one slot (one row of the KV cache) and at most one token in flight;
every :meth:`DepthBatch.tick`

    (a) runs the prelude (embedding, prelude blocks, prelude norm, h₀) for the tokens entering,
    (b) runs ONE recurrent iteration (``LoopedLM.recurrent_step``) for every token in flight, whatever its own
        iteration t_b, in one batched call; each token stores and reads the KV slot its own iteration and the
        KV policy give it (:meth:`LoopKVCache.loop_rows`),
    (c) checks the exit rule for the tokens at a checked iteration (min_loops, min_loops + exit_every, ...,
        max_loops), the rule's running quantities kept per slot (:meth:`ExitTracker.restart` at entry),
    (d) reads out (C, coda, head) only the tokens that exit (or, for an output-based rule, the checked ones),
    (e) draws each exiting token's successor with :func:`~parcae.inference.engine.draw_step` (the rules and
        per-row generators of every decode step); the caller enters it at the next tick.

The prelude and the read-out are skipped in a tick where no token needs them. The math is the model's own
(``prelude_step``, ``loop_input``, ``recurrent_step``, ``read_out``); a token computes exactly what it computes in
:meth:`Engine.stream` alone, so tokens, depths and log-probabilities are the same (tests/inference/
test_depth_batching.py). Under the ``full`` policy a token keeps computing all ``max_loops`` iterations (its
output is fixed at its exit), so its successor enters only after them: exact, and as slow as the fixed depth.

    batch = DepthBatch(engine, engine.new_cache(16, 256), sequences=torch.zeros(16, dtype=torch.long))
    batch.admit(slot, sampling, generator)            # a request takes a slot (its prompt prefilled there)
    batch.enter(slot, token, col, position)           # its next input token enters at the next tick
    for exit in batch.tick(): ...                     # tokens whose loop ended this tick, their successors drawn

Where it pays: a CPU step already computes only the rows still looping, and a tick pays the prelude's, the coda's
and the head's calls for the few tokens entering and leaving, so on the CPU depth-level ticks measured slower than
token-level steps; they pay where a call costs about the same for few rows as for many (an accelerator below
saturation). :func:`default_gather` picks accordingly (docs/inference.md, docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor

from parcae.model.loop import pick

from .engine import Engine, Generation, Sampling, TokenLogprobs, draw_step, row_generators
from .cache import LoopKVCache
from .exits import ExitRule, ScriptedDepth


@dataclass
class Exit:
    """A token whose loop ended at this tick: its slot, the drawn successor, the depth of its output."""
    slot: int
    token: int
    depth: int
    logprobs: Optional[TokenLogprobs] = None
    error: Optional[str] = None   # the row's sampling failed (``token`` is meaningless)


def supports(engine: Engine) -> bool:
    """Whether ``engine``'s tokens can run depth-level: a looped model whose exit rule (if any) keeps per-token
    state a new token can restart (every :class:`~parcae.inference.exits.ExitRule` and
    :class:`~parcae.inference.exits.ScriptedDepth` do; the step-counted test rule ``ForcedDepth`` does not), and
    not through a compiled engine (its static cache has no per-row iteration slots: it decodes token-level steps)."""
    if not engine.config.looped or engine.speculate is not None or engine.compiled is not None:
        return False
    return not engine.adaptive or isinstance(engine.exit, (ExitRule, ScriptedDepth))


def default_gather(engine: Engine) -> int:
    """The ``gather`` a caller that names none gets: 1 (depth-level ticks) on an accelerator, where a call costs
    about the same for a few rows as for many so a step that waits for its deepest row wastes it; 0 (token-level
    steps) on the CPU, where depth-level ticks measured slower — a CPU step already computes only the rows still
    looping, and each tick pays the prelude's, the coda's and the head's calls for a few tokens
    (benchmarks/depth_batching.py, docs/benchmarks.md)."""
    return 0 if engine.device.type == "cpu" else 1


class DepthBatch:
    """The slots of one engine (one set of depth options) and cache, stepped one loop iteration per tick."""

    def __init__(self, engine: Engine, cache: LoopKVCache, sequences: Tensor, gather: int = 1) -> None:
        """``gather``: the tokens whose loop is over wait (computing nothing) until ``gather`` of them are
        waiting or no token loops any more, then are read out and draw their successors together: 1 reads each
        out at its exit and refills its slot at once; more makes fewer, larger read-out and prelude calls (for
        hardware where a call's fixed cost dominates), at the price of idle slots. The numbers are the same."""
        if not engine.config.looped:
            raise ValueError(f"depth-level batching needs a looped model; {engine.config.name} has no loop")
        self.engine, self.model, self.cache, self.sequences = engine, engine.model, cache, sequences
        B, d, dev = cache.B, engine.config.d_model, engine.device
        dtype = next(self.model.parameters()).dtype
        self.B, self.dev = B, dev
        if isinstance(gather, bool) or not isinstance(gather, int) or gather < 1:
            raise ValueError(f"gather must be an integer >= 1, got {gather!r}")
        self.gather = gather
        self.adaptive = engine.adaptive
        self.max_loops = engine.max_loops if self.adaptive else engine.loops
        self.keep_computing = self.adaptive and engine.policy.kind == "full"
        rule = engine.exit
        if not supports(engine):
            raise ValueError(f"exit rule {rule} keeps no per-token state that a new token can restart; it cannot "
                             "run depth-level")
        # per slot, on the host
        self.iteration = [0] * B        # iterations the slot's token has run
        self.busy = [False] * B         # a token in flight
        self.deciding = [False] * B     # its output not fixed yet
        self.depth = [0] * B            # its output's depth (once fixed)
        self.waiting = [False] * B      # its loop is over: read-out and successor pending (see ``gather``)
        self.read = [False] * B         # its logits are in out_logits already (an output-based rule's check)
        self.col, self.pos = [0] * B, [0] * B
        self.pending: dict[int, tuple[int, int, int, Optional[Tensor]]] = {}   # slot -> (token, col, pos, state)
        self.samplings: list[Sampling] = [Sampling()] * B
        self.generators: list[Optional[torch.Generator]] = [None] * B
        self.logprobs: list[Optional[int]] = [None] * B
        # per slot, on the device: the loop's inputs and state
        self.h = torch.zeros(B, 1, d, device=dev, dtype=dtype)
        self.h0 = torch.zeros_like(self.h)
        self.drive: Optional[Tensor] = None
        self.rope: Optional[Tensor] = None
        self.value_embeddings: dict[int, Tensor] = {}
        self.out_state = torch.zeros_like(self.h)   # the state read out at the exit (warm start of the next token)
        self.out_logits: Optional[Tensor] = None    # logits of waiting tokens (read out at a check, or gathered)
        self.tracker = rule.start(self.h, engine.config.vocab_size) if self.adaptive else None
        self.ticks = 0

    # -- slots ---------------------------------------------------------------------------------------------
    def admit(self, slot: int, sampling: Sampling, generator: torch.Generator, logprobs: Optional[int] = None) -> None:
        """A request takes ``slot``: its sampling settings, generator and the log-probabilities it asks for."""
        self.samplings[slot], self.generators[slot], self.logprobs[slot] = sampling, generator, logprobs

    def enter(self, slot: int, token: int, col: int, position: int, state: Optional[Tensor] = None) -> None:
        """``token`` (at cache column ``col``, sequence position ``position``) enters the loop at the next tick.
        ``state`` [1, 1, d]: its warm start (``continuous``); default the slot's previous token's exit state."""
        if self.busy[slot] or self.waiting[slot] or slot in self.pending:
            raise ValueError(f"slot {slot} already has a token in flight")
        self.pending[slot] = (int(token), int(col), int(position), state)

    def release(self, slot: int) -> None:
        """Drop the slot's token in flight, if any (a cancelled request); the caller releases its cache row."""
        self.pending.pop(slot, None)
        self.busy[slot] = self.deciding[slot] = self.waiting[slot] = self.read[slot] = False

    @property
    def active(self) -> bool:
        return bool(self.pending) or any(self.busy) or any(self.waiting)

    # -- one tick --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def tick(self) -> list[Exit]:
        """One loop iteration for every token in flight (module docstring); the tokens whose loop ended."""
        entering = sorted(self.pending)
        looping = [b for b in range(self.B) if self.busy[b] or b in self.pending]
        if not looping:   # (only after a release) tokens left waiting: read them out
            waiting = [b for b in range(self.B) if self.waiting[b]]
            return self._draw(waiting, self._outputs(waiting, {}, None, None, {})) if waiting else []
        self.ticks += 1
        dev, model, cache = self.dev, self.model, self.cache
        for b in entering:
            self.col[b], self.pos[b] = self.pending[b][1], self.pending[b][2]
        n = len(looping)
        rows = None if n == self.B else torch.tensor(looping, dtype=torch.long, device=dev)
        cols = torch.tensor([self.col[b] for b in looping], dtype=torch.long, device=dev)[:, None]
        cache.begin(cols, None, rows, max(self.col[b] for b in looping))  # every token real
        where = {b: i for i, b in enumerate(looping)}   # slot -> its row in this tick's step
        if entering:
            self._enter(entering, where)
        # (b) one iteration of every token in flight, each at its own iteration
        its = [self.iteration[b] for b in looping]
        iterations = torch.tensor(its, dtype=torch.long, device=dev)
        h_in, drive, rope = pick(self.h, rows), pick(self.drive, rows), pick(self.rope, rows)
        ve = {i: pick(v, rows) for i, v in self.value_embeddings.items()}
        caches = [cache.loop_rows(r, iterations, None, None, top=max(its)) for r in range(len(model.recurrent))]
        h_out = model.recurrent_step(h_in, drive, rope, ve, caches)
        if rows is None:
            self.h = h_out
        else:
            self.h.index_copy_(0, rows, h_out)
        for b in looping:
            self.iteration[b] += 1
        self.engine.count(n)
        # (c) exit checks (and an output-based rule's read-outs); a token whose loop is over waits for (d, e)
        if self.adaptive:
            self._check(looping, h_in, h_out, rope, ve)
        else:
            for b in looping:
                if self.iteration[b] >= self.max_loops:
                    self.deciding[b], self.depth[b] = False, self.max_loops
            done = [i for i, b in enumerate(looping) if not self.deciding[b]]
            if done:
                self.out_state.index_copy_(0, _index(done, looping, dev, slots=True),
                                           h_out.index_select(0, _index(done, looping, dev)))
        for b in looping:
            if not self.deciding[b] and (not self.keep_computing or self.iteration[b] >= self.max_loops):
                self.busy[b], self.waiting[b] = False, True
        # (d, e) read-out of the waiting tokens and their successors, once `gather` wait or nobody else loops
        waiting = [b for b in range(self.B) if self.waiting[b]]
        if not waiting or (len(waiting) < self.gather and any(self.busy)):
            return []
        return self._draw(waiting, self._outputs(waiting, where, h_out, rope, ve))

    def _enter(self, entering: list[int], where: dict[int, int]) -> None:
        """(a) the prelude of the entering tokens, their h₀ and drive B̄e into their slots."""
        dev, model, engine = self.dev, self.model, self.engine
        E = torch.tensor(entering, dtype=torch.long, device=dev)
        sub = None if len(entering) == len(where) else torch.tensor([where[b] for b in entering], device=dev)
        tokens = torch.tensor([self.pending[b][0] for b in entering], dtype=torch.long, device=dev)[:, None]
        positions = torch.tensor([self.pos[b] for b in entering], dtype=torch.long, device=dev)[:, None]
        x, rope, ve = model.prelude_step(tokens, positions, self.cache, None, sub)
        init = None
        if engine.continuous:
            init = torch.cat([self.pending[b][3] if self.pending[b][3] is not None else self.out_state[b:b + 1]
                              for b in entering]).to(x.dtype)
        e, h0 = model.loop_input(x, init, engine.seed, self.sequences.index_select(0, E), positions)
        drive = model.injection.input_term(e)
        if self.drive is None:
            self.drive = torch.zeros(self.B, *drive.shape[1:], device=dev, dtype=drive.dtype)
            self.rope = torch.zeros(self.B, *rope.shape[1:], device=dev, dtype=rope.dtype)
            self.value_embeddings = {i: torch.zeros(self.B, *v.shape[1:], device=dev, dtype=v.dtype)
                                     for i, v in ve.items()}
        self.h.index_copy_(0, E, h0)
        self.h0.index_copy_(0, E, h0)
        self.drive.index_copy_(0, E, drive)
        self.rope.index_copy_(0, E, rope)
        for i, v in self.value_embeddings.items():
            v.index_copy_(0, E, ve[i])
        if self.tracker is not None:
            self.tracker.restart(E, h0)
        for b in entering:
            self.iteration[b], self.busy[b], self.deciding[b] = 0, True, True
        self.pending.clear()

    def _check(self, looping: list[int], h_in: Tensor, h_out: Tensor, rope: Tensor, ve: dict[int, Tensor]) -> None:
        """(c) the exit rule for the deciding tokens at a checked iteration (an output-based rule reads them out
        first, and keeps the logits of the ones that exit); the exiting ones' depth and state are recorded."""
        e, dev = self.engine, self.dev
        checked = [i for i, b in enumerate(looping) if self.deciding[b] and self._is_check(self.iteration[b])]
        if not checked:
            return
        C = _index(checked, looping, dev)
        slots = _index(checked, looping, dev, slots=True)
        h = h_out.index_select(0, C)
        logits = None
        if e.exit.needs_logits:
            logits = self.model.read_out(h, rope.index_select(0, C), {i: v.index_select(0, C) for i, v in ve.items()},
                                         self.cache, C, None)
            e.count(0, len(checked))
        h_before = None
        if e.exit_every == 1:   # the previous check was the previous iteration (the first check's: h₀)
            h_before = h_in.index_select(0, C)
            first = [self.iteration[looping[i]] == e.min_loops for i in checked]
            if e.min_loops > 1 and any(first):
                h_before = torch.where(torch.tensor(first, device=dev)[:, None, None], self.h0.index_select(0, slots),
                                       h_before)
        converged, _ = self.tracker.update(h, logits, slots, h_before)
        last = torch.tensor([self.iteration[looping[i]] >= self.max_loops for i in checked], device=dev)
        stop = (converged[:, 0] | last).tolist()   # the tick's device read: which tokens exit
        keep = [j for j, s in enumerate(stop) if s]
        if not keep:
            return
        for j in keep:
            b = looping[checked[j]]
            self.deciding[b], self.depth[b] = False, self.iteration[b]
        K = torch.tensor(keep, dtype=torch.long, device=dev)
        exit_slots = slots.index_select(0, K)
        self.out_state.index_copy_(0, exit_slots, h.index_select(0, K))
        if logits is not None:
            if self.out_logits is None:
                self.out_logits = torch.zeros(self.B, *logits.shape[1:], device=logits.device)
            self.out_logits.index_copy_(0, exit_slots, logits.index_select(0, K))
            for j in keep:
                self.read[looping[checked[j]]] = True

    def _is_check(self, n: int) -> bool:
        e = self.engine
        return n >= self.max_loops or (n >= e.min_loops and (n - e.min_loops) % e.exit_every == 0)

    def _outputs(self, waiting: list[int], where: dict[int, int], h_out: Tensor, rope: Tensor,
                 ve: dict[int, Tensor]) -> Tensor:
        """(d) logits [len(waiting), 1, V'] of the waiting tokens: C, coda and head on their exit states (storing
        the coda's keys/values), or the logits an output-based rule already read out."""
        dev = self.dev
        unread = [b for b in waiting if not self.read[b]]
        if unread:
            self.engine.count(0, len(unread))
            U = torch.tensor(unread, dtype=torch.long, device=dev)
            state = self.out_state.index_select(0, U)
            if all(b in where for b in unread):   # rows of this tick: its RoPE, value embeddings and cache step
                index = None if len(unread) == len(where) else \
                    torch.tensor([where[b] for b in unread], dtype=torch.long, device=dev)
                logits = self.model.read_out(state, pick(rope, index), {i: pick(v, index) for i, v in ve.items()},
                                             self.cache, index, None)
            else:   # some left the loop at an earlier tick: a cache step of their own
                cols = torch.tensor([self.col[b] for b in unread], dtype=torch.long, device=dev)[:, None]
                self.cache.begin(cols, None, U, max(self.col[b] for b in unread))
                logits = self.model.read_out(state, self.rope.index_select(0, U),
                                             {i: v.index_select(0, U) for i, v in self.value_embeddings.items()},
                                             self.cache, None, None)
            if len(unread) == len(waiting):
                return logits
            if self.out_logits is None:
                self.out_logits = torch.zeros(self.B, *logits.shape[1:], device=logits.device)
            self.out_logits.index_copy_(0, torch.tensor(unread, dtype=torch.long, device=dev), logits)
        return self.out_logits.index_select(0, torch.tensor(waiting, dtype=torch.long, device=dev))

    def _draw(self, ending: list[int], logits: Tensor) -> list[Exit]:
        """(e) the successors of the tokens whose loop ended (their slots free for the next token)."""
        n = len(ending)
        step = draw_step(logits[:, -1], torch.tensor([self.depth[b] for b in ending], device=self.dev), None,
                         range(n), [self.samplings[b] for b in ending], [self.generators[b] for b in ending],
                         self.engine.config.vocab_size, [self.logprobs[b] for b in ending])
        ids, depths, lps = step.read()
        out = []
        for j, b in enumerate(ending):
            self.busy[b] = self.deciding[b] = self.waiting[b] = self.read[b] = False
            out.append(Exit(b, ids[j], depths[j], lps[j], step.errors.get(j)))
        return out


def _index(picked: list[int], looping: list[int], dev, slots: bool = False) -> Tensor:
    """The rows ``picked`` of a tick (or, with ``slots``, their slots) as an index tensor."""
    return torch.tensor([looping[i] for i in picked] if slots else picked, dtype=torch.long, device=dev)


@torch.no_grad()
def generate(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             sampling: Sampling | Sequence[Sampling] = Sampling(), stop_ids: Sequence[int] = (),
             padding: str = "left", sequences: Optional[Sequence[int]] = None, gather: int = 1) -> list[Generation]:
    """:meth:`Engine.generate`'s results, each prompt's tokens decoded in depth-level ticks (a row whose token
    exits early draws its next token while the others still loop; ``gather``: see :class:`DepthBatch`): the same
    tokens and depths as :meth:`Engine.stream`."""
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    engine.check_request(prompts, max_new_tokens)
    results = [Generation() for _ in prompts]
    if max_new_tokens == 0:
        return results
    start = engine.start(prompts, max_new_tokens, padding, sequences)
    B = start.B
    per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * B
    generators = row_generators(per_row, start.sequences, engine.device)
    batch = DepthBatch(engine, start.cache, start.seq_ids, gather)
    first = start.tokens[:, 0].tolist()
    stops = set(int(t) for t in stop_ids)
    for b in range(B):
        if start.limits[b] > 0:
            batch.admit(b, per_row[b], generators[b])
            batch.enter(b, first[b], start.cols[b], start.positions[b],
                        None if start.state is None else start.state[b:b + 1])
    while batch.active:
        for x in batch.tick():
            if x.error is not None:
                raise RuntimeError(f"row {x.slot}: sampling failed: {x.error}")
            r = results[x.slot]
            r.tokens.append(x.token)
            r.depths.append(x.depth)
            r.stopped = x.token in stops
            if not r.stopped and len(r.tokens) < start.limits[x.slot]:
                batch.enter(x.slot, x.token, batch.col[x.slot] + 1, batch.pos[x.slot] + 1)
    return results
