"""Continuous batching over the engine (plain PyTorch): requests join and leave the running batch between steps.

    scheduler = Scheduler(model, max_rows=8, stop_ids=[eos])
    scheduler.start()                                   # a background thread runs the steps
    ticket = scheduler.submit(Job([bos, *ids], max_new_tokens=32, sampling=Sampling(temperature=0.8), seed=7),
                              sink=events.put)          # sink gets one TokenEvent per token; the last has `finish`
    scheduler.cancel(ticket)                            # e.g. the client went away: the row leaves at the next step
    scheduler.close()

How it runs. Rows are grouped into *lanes*, one per distinct :class:`DepthOptions` (resolved by
:meth:`DepthOptions.resolved`, so ``kl``, ``kl:1e-3`` and ``kl:0.001``, or ``kv_policy`` omitted and ``latest``, are
one lane; the options themselves are the lane's key): a lane is one :class:`~parcae.inference.engine.Engine` and
one KV cache of ``max_rows`` fixed slots, each slot the full context long. Depth options change the forward itself
(how many iterations, whether and how tokens exit, what the cache keeps), so rows with different options cannot
share a forward; a step runs one forward per lane that has work. Every step:

1. drops cancelled rows (their slot is released: :meth:`LoopKVCache.release` forgets its entries);
2. admits queued requests, first come first served, while fewer than ``max_rows`` rows run (over all lanes); at
   most ``max_lanes`` lanes exist at once (each holds ``max_rows`` full-context caches): a request whose lane
   cannot open yet stays queued while later requests of open lanes join theirs, and the lane with the fewest rows
   admits no one until it empties, so the waiting request gets a lane in bounded time;
3. prefills each new row's prompt but its last token into its slot, ``prefill_chunk`` tokens per step, so a long
   prompt is spread over several steps instead of stalling every other row for its whole length;
4. runs one decode step for every row whose prompt is in — :func:`~parcae.inference.engine.decode_step`, the same
   step :meth:`Engine.stream` runs — at the row's own column and position (idle slots cost nothing), the next
   token drawn with the row's own sampling settings and generator; a row that hit a stop id or its token limit
   leaves at once, freeing its slot for the next request. A lane with an exit rule on an accelerator (or with
   ``depth_gather`` >= 1) instead runs one depth-level tick (:class:`~parcae.inference.depth_batching.DepthBatch`):
   one loop iteration for every token in flight, each at its own iteration, so a row whose token exits early goes
   on to its next token while the others still loop.

The queue holds at most ``max_queue`` requests (default 4 x ``max_rows``); :meth:`Scheduler.submit` raises
:class:`Overloaded` beyond that (the server answers 429).

A row's numbers are the ones :meth:`Engine.stream` gives the same prompt alone: each slot holds one sequence from
column 0 (so column = position), the initial-state noise is that of sequence 0, and the sampling generator is
seeded with :func:`~parcae.inference.engine.generator_seed` of (seed, 0). Nothing a request asks for can fail
another: depth options are resolved at :meth:`submit`, a row whose sampling fails ends alone with an error event
(its neighbours draw on), and an exception in a lane's forward fails that lane's rows only (the lane is rebuilt
for the next request).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from parcae.model import LoopedLM
from parcae.model.state import positional_noise

from .depth_batching import DepthBatch, default_gather, supports
from .engine import Engine, Sampling, decode_step, generator_seed
from .options import DepthOptions


class Overloaded(RuntimeError):
    """The queue is full: the request is refused now rather than left waiting without bound (HTTP 429)."""


@dataclass
class Job:
    """What one request asks for. ``depth``: its :class:`DepthOptions` (resolved by :meth:`Scheduler.submit` if
    the caller has not; equal resolved options share one lane). ``logprobs``: None reports none; 0 the chosen
    token's log-probability (with an empty top list, as OpenAI answers ``logprobs: 0``); N > 0 also the top N."""
    prompt: list[int]
    max_new_tokens: int
    depth: DepthOptions = field(default_factory=DepthOptions)
    sampling: Sampling = field(default_factory=Sampling)
    seed: int = 0
    logprobs: Optional[int] = None


@dataclass
class TokenEvent:
    """One generated token of a row (``token`` None on an event that only ends the row: cancelled or error).
    ``logprob`` and ``top`` are log-probabilities under the model's distribution (before temperature/top-k/p)."""
    token: Optional[int]
    depth: int = 0
    logprob: Optional[float] = None
    top: Optional[list[tuple[int, float]]] = None
    finish: Optional[str] = None     # "stop" (a stop id), "length", "cancelled", "error"; None while running
    error: Optional[str] = None


class Ticket:
    """The caller's handle on a submitted job."""

    def __init__(self, ident: int) -> None:
        self.id, self.cancelled = ident, False


@dataclass
class _Row:
    ticket: Ticket
    job: Job
    sink: Callable[[TokenEvent], None]
    generator: torch.Generator
    slot: int
    fed: int = 0        # prompt tokens in the cache (all but the last go in by prefill)
    generated: int = 0
    looping: bool = False   # a depth-level lane: the row's tokens have started entering its loop

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.job.prompt) - 1


class _Lane:
    """One engine (one set of depth options) and its KV cache of fixed slots."""

    def __init__(self, engine: Engine, slots: int, capacity: int, depth_gather: Optional[int] = None) -> None:
        self.engine, self.capacity = engine, capacity
        self.sequences = torch.zeros(slots, dtype=torch.long, device=engine.device)  # every slot is sequence 0
        self.cache = engine.new_cache(slots, capacity)
        self.rows: list[Optional[_Row]] = [None] * slots
        self.token = [0] * slots    # the token each slot feeds at the next decode step
        cfg = engine.config
        dtype = next(engine.model.parameters()).dtype
        self.state = (torch.zeros(slots, 1, cfg.d_model, device=engine.device, dtype=dtype)
                      if engine.continuous else None)   # warm start: the previous token's final state per slot
        # with an exit rule the lane decodes in depth-level ticks (one loop iteration per tick for every token)
        gather = default_gather(engine) if depth_gather is None else depth_gather
        self.depth = DepthBatch(engine, self.cache, self.sequences, gather) \
            if gather and engine.adaptive and supports(engine) else None

    def free_slot(self) -> Optional[int]:
        return next((i for i, r in enumerate(self.rows) if r is None), None)

    def live(self) -> list[_Row]:
        return [r for r in self.rows if r is not None]


class Scheduler:
    def __init__(self, model: LoopedLM, *, max_rows: int = 8, stop_ids: Sequence[int] = (),
                 prefill_chunk: int = 256, max_lanes: int = 4, max_queue: Optional[int] = None,
                 depth_gather: Optional[int] = None, compile: bool = False) -> None:
        """``max_rows`` rows decode at once over all lanes; at most ``max_lanes`` lanes (distinct depth options)
        exist at once, each holding ``max_rows`` full-context KV caches; at most ``max_queue`` (default
        4 x max_rows) requests wait, beyond which :meth:`submit` raises :class:`Overloaded`. ``depth_gather`` N >= 1:
        lanes with an exit rule decode in depth-level ticks (:mod:`parcae.inference.depth_batching`), their exited
        tokens read out N at a time (:class:`~parcae.inference.depth_batching.DepthBatch`'s ``gather``); 0: in
        token-level steps like the fixed-depth lanes (each step runs to its deepest row); None:
        :func:`~parcae.inference.depth_batching.default_gather` (1 on an accelerator, 0 on the CPU).
        ``compile``: every lane's engine decodes through its compiled step (``Engine(..., compile=True)``)."""
        max_queue = 4 * max_rows if max_queue is None else max_queue
        for name, value in (("max_rows", max_rows), ("prefill_chunk", prefill_chunk), ("max_lanes", max_lanes),
                            ("max_queue", max_queue)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if depth_gather is not None and (isinstance(depth_gather, bool) or not isinstance(depth_gather, int)
                                         or depth_gather < 0):
            raise ValueError(f"depth_gather must be an integer >= 0, got {depth_gather!r}")
        self.model, self.max_rows, self.prefill_chunk = model, max_rows, prefill_chunk
        self.max_lanes, self.max_queue, self.depth_gather = max_lanes, max_queue, depth_gather
        self.compile = compile
        self.stop_ids = set(int(s) for s in stop_ids)
        self.capacity = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        self._lanes: dict[DepthOptions, _Lane] = {}   # by resolved depth options
        self._queue: deque[_Row] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.counts = {"submitted": 0, "admitted": 0, "finished": 0, "cancelled": 0, "failed": 0, "steps": 0,
                       "refused": 0}

    # -- the caller's side (any thread) ----------------------------------------------------------------------
    def submit(self, job: Job, sink: Callable[[TokenEvent], None]) -> Ticket:
        """Queue a job; ``sink`` is called from the scheduler's thread with each event (keep it quick). Its depth
        options are resolved here (ValueError if the model cannot take them); :class:`Overloaded` if ``max_queue``
        requests already wait."""
        if job.max_new_tokens < 1 or not job.prompt:
            raise ValueError("a job needs a prompt and max_new_tokens >= 1")
        job = dataclasses.replace(job, depth=job.depth.resolved(self.model.config))  # the lane key
        ticket = Ticket(next(self._ids))
        generator = torch.Generator(device=self.device).manual_seed(generator_seed(job.seed, 0))
        with self._cond:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._queue) >= self.max_queue:
                self.counts["refused"] += 1
                raise Overloaded(f"the server is busy: {len(self._queue)} requests already wait (max_queue "
                                 f"{self.max_queue}); retry later")
            self._queue.append(_Row(ticket, job, sink, generator, slot=-1))
            self.counts["submitted"] += 1
            self._cond.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Stop a job; its row leaves the batch before the next step (a no-op for a finished job)."""
        with self._cond:
            ticket.cancelled = True
            self._cond.notify()

    def stats(self) -> dict:
        lanes = list(self._lanes.values())  # one C-level copy: the scheduler's thread may change the dict
        with self._cond:
            active = sum(len(lane.live()) for lane in lanes)
            return {**self.counts, "active": active, "queued": len(self._queue), "lanes": len(lanes),
                    "max_rows": self.max_rows, "max_lanes": self.max_lanes, "max_queue": self.max_queue,
                    "running": self.running}

    @property
    def running(self) -> bool:
        """The scheduler's thread is alive (it was started and not closed)."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> "Scheduler":
        self._thread = threading.Thread(target=self._run, name="parcae-scheduler", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        """Cancel everything and stop the thread (it finishes the step in progress)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._queue and not any(l.live() for l in self._lanes.values()):
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception as err:  # a fault outside any lane (a bug): end every row with it, keep serving
                failed = [*(r for lane in self._lanes.values() for r in lane.live())]
                self._lanes.clear()
                for row in failed:
                    self._end(row, TokenEvent(None, finish="error", error=f"{type(err).__name__}: {err}"), "failed")
        for row in [*self._queue, *(r for lane in self._lanes.values() for r in lane.live())]:
            self._end(row, TokenEvent(None, finish="cancelled"), "cancelled")

    # -- one step (the scheduler's thread) -------------------------------------------------------------------
    def step(self) -> None:
        for key, lane in list(self._lanes.items()):
            for row in lane.live():
                if row.ticket.cancelled:
                    self._leave(lane, row, TokenEvent(None, finish="cancelled"), "cancelled")
        self._admit()
        for key, lane in list(self._lanes.items()):
            try:
                self._prefill(lane)
                self._decode(lane)
            except Exception as err:  # a fault of this lane's forward fails its rows only; the lane is rebuilt
                for row in lane.live():
                    self._end(row, TokenEvent(None, finish="error", error=f"{type(err).__name__}: {err}"), "failed")
                del self._lanes[key]
                continue
            if not lane.live():
                del self._lanes[key]   # its cache is freed; the next request with these options allocates anew

    def _admit(self) -> None:
        """Queued jobs in arrival order while rows are free: a job joins its lane, or opens one if fewer than
        ``max_lanes`` exist; a job whose lane cannot open yet stays queued and the jobs behind it still join their
        lanes. So that it does not wait forever, the lane with the fewest rows then admits no one until it empties
        and closes (draining), which frees a lane for the oldest waiting job."""
        with self._cond:
            queue = list(self._queue)
        waiting: Optional[DepthOptions] = None   # the depth of the oldest job that needs a lane that is not there
        taken: set[int] = set()
        for row in queue:
            if sum(len(lane.live()) for lane in self._lanes.values()) >= self.max_rows:
                break
            if row.ticket.cancelled:
                taken.add(id(row))
                self._end(row, TokenEvent(None, finish="cancelled"), "cancelled")
                continue
            key = row.job.depth
            lane = self._lanes.get(key)
            if lane is None and len(self._lanes) >= self.max_lanes:
                waiting = waiting or key
                continue
            if lane is not None and waiting is not None and key == self._draining():
                continue   # the draining lane takes no one new
            if lane is None:
                try:
                    engine = Engine.from_options(self.model, key, compile=self.compile)
                    gather = 0 if self.compile else self.depth_gather  # compiled lanes decode token-level steps
                    lane = self._lanes[key] = _Lane(engine, self.max_rows, self.capacity, gather)
                except Exception as err:
                    taken.add(id(row))
                    self._end(row, TokenEvent(None, finish="error", error=f"{type(err).__name__}: {err}"), "failed")
                    continue
            taken.add(id(row))
            row.slot = lane.free_slot()
            lane.rows[row.slot] = row
            lane.token[row.slot] = row.job.prompt[-1]
            self.counts["admitted"] += 1
            if len(row.job.prompt) == 1 and lane.state is not None:  # no earlier token: the initial noise
                lane.state[row.slot] = self._noise(lane.engine, 0)
        if taken:
            with self._cond:
                self._queue = deque(r for r in self._queue if id(r) not in taken)

    def _draining(self) -> Optional[DepthOptions]:
        """The lane that admits no one while a job waits for a lane: the one with the fewest rows (the first such)."""
        return min(self._lanes, key=lambda k: len(self._lanes[k].live()), default=None)

    def _prefill(self, lane: _Lane) -> None:
        """One chunk of every new row's prompt (all but its last token) into the row's slot."""
        rows = [r for r in lane.live() if not r.decoding]
        if not rows:
            return
        B, dev = len(lane.rows), self.device
        S = min(self.prefill_chunk, max(len(r.job.prompt) - 1 - r.fed for r in rows))
        tokens = torch.zeros(B, S, dtype=torch.long)
        start = torch.zeros(B, dtype=torch.long)
        count = torch.zeros(B, dtype=torch.long)
        for r in rows:
            piece = r.job.prompt[r.fed: min(r.fed + S, len(r.job.prompt) - 1)]
            tokens[r.slot, : len(piece)] = torch.tensor(piece)
            start[r.slot], count[r.slot] = r.fed, len(piece)
        offsets = torch.arange(S)
        # distinct columns within each row (a repeated column would make the cache write ambiguous); the padding
        # of a row ending near the end of its slot wraps to columns before its real tokens, which it never writes
        cols = (start[:, None] + offsets) % lane.capacity
        slots = sorted(r.slot for r in rows)
        max_col = int(cols[slots].max())
        real = (offsets < count[:, None]).to(dev)
        cols = cols.to(dev)
        out = lane.engine.forward(lane.cache, tokens.to(dev), cols, cols, real, torch.zeros(B, dtype=torch.long,
                                  device=dev), adaptive=False, need_logits=False, rows=slots, max_col=max_col)
        for r in rows:
            n = int(count[r.slot])
            r.fed += n
            if r.decoding and lane.state is not None:   # warm start of the last prompt token: the state before it
                lane.state[r.slot] = out.state[r.slot, n - 1: n]

    def _tick(self, lane: _Lane) -> None:
        """A depth-level lane's step: the rows whose prompt is now in enter their last prompt token, then one
        :meth:`DepthBatch.tick` (one loop iteration of every token in flight); a row whose token exited gets its
        event and, unless it is done, its next token enters at the next tick."""
        batch = lane.depth
        for r in lane.live():
            if r.decoding and not r.looping:
                r.looping = True
                batch.admit(r.slot, r.job.sampling, r.generator, r.job.logprobs)
                batch.enter(r.slot, lane.token[r.slot], r.fed, r.fed,
                            None if lane.state is None else lane.state[r.slot:r.slot + 1])
        if not batch.active:
            return
        exits = batch.tick()
        self.counts["steps"] += 1
        for x in exits:
            r = lane.rows[x.slot]
            if x.error is not None:
                self._leave(lane, r, TokenEvent(None, finish="error", error=x.error), "failed")
                continue
            r.generated += 1
            event = TokenEvent(x.token, x.depth)
            if x.logprobs is not None:
                event.logprob, event.top = x.logprobs.chosen, x.logprobs.top
            if x.token in self.stop_ids or r.generated >= r.job.max_new_tokens:
                event.finish = "stop" if x.token in self.stop_ids else "length"
                self._leave(lane, r, event, "finished")
            else:
                col = r.fed + r.generated
                batch.enter(r.slot, x.token, col, col)
                self._send(r, event)

    def _decode(self, lane: _Lane) -> None:
        """One token for every row whose prompt is in (:func:`~parcae.inference.engine.decode_step`, the step
        :meth:`Engine.stream` runs); a row whose sampling fails ends with an error, the others go on."""
        if lane.depth is not None:
            self._tick(lane)
            return
        rows = [r for r in lane.live() if r.decoding]
        if not rows:
            return
        B, dev = len(lane.rows), self.device
        cols = torch.zeros(B, dtype=torch.long)
        samplings: list[Sampling] = [Sampling()] * B
        generators: list[Optional[torch.Generator]] = [None] * B
        logprobs: list[Optional[int]] = [None] * B
        for r in rows:
            cols[r.slot] = r.fed + r.generated
            samplings[r.slot], generators[r.slot], logprobs[r.slot] = r.job.sampling, r.generator, r.job.logprobs
        slots = sorted(r.slot for r in rows)
        cols = cols.to(dev)
        step = decode_step(lane.engine, lane.cache, torch.tensor(lane.token, dtype=torch.long, device=dev), cols,
                           cols, lane.sequences, slots, max(r.fed + r.generated for r in rows), samplings,
                           generators, initial_state=lane.state, logprobs=logprobs)
        tokens_now, depths, lps = step.read()   # the step's one device -> host read
        if lane.state is not None:
            decoded = torch.zeros(B, dtype=torch.bool)
            decoded[slots] = True
            lane.state = torch.where(decoded.to(dev)[:, None, None], step.state, lane.state)
        self.counts["steps"] += 1
        for r in rows:
            if r.slot in step.errors:
                self._leave(lane, r, TokenEvent(None, finish="error", error=step.errors[r.slot]), "failed")
                continue
            t = tokens_now[r.slot]
            r.generated += 1
            event = TokenEvent(t, depths[r.slot])
            if lps[r.slot] is not None:
                event.logprob, event.top = lps[r.slot].chosen, lps[r.slot].top
            if t in self.stop_ids or r.generated >= r.job.max_new_tokens:
                event.finish = "stop" if t in self.stop_ids else "length"
                self._leave(lane, r, event, "finished")
            else:
                lane.token[r.slot] = t
                self._send(r, event)

    # -- rows leaving ----------------------------------------------------------------------------------------
    def _leave(self, lane: _Lane, row: _Row, event: TokenEvent, count: str) -> None:
        lane.rows[row.slot] = None
        lane.cache.release(row.slot)
        if lane.depth is not None:
            lane.depth.release(row.slot)
        self._end(row, event, count)

    def _end(self, row: _Row, event: TokenEvent, count: str) -> None:
        with self._cond:
            self.counts[count] += 1
        self._send(row, event)

    def _send(self, row: _Row, event: TokenEvent) -> None:
        try:
            row.sink(event)
        except Exception:  # a caller that cannot take events any more: stop its row
            row.ticket.cancelled = True

    def _noise(self, engine: Engine, position: int) -> Tensor:
        cfg = engine.config
        zero = torch.zeros(1, dtype=torch.long, device=self.device)
        return positional_noise(engine.seed, zero, torch.full((1, 1), position, device=self.device), cfg.d_model,
                                cfg.state_std, next(self.model.parameters()).dtype)[0]
