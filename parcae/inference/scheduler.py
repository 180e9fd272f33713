"""Continuous batching over the engine (plain PyTorch): requests join and leave the running batch between steps.

    scheduler = Scheduler(model, max_rows=8, stop_ids=[eos])
    scheduler.start()                                   # a background thread runs the steps
    ticket = scheduler.submit(Job([bos, *ids], max_new_tokens=32, sampling=Sampling(temperature=0.8), seed=7),
                              sink=events.put)          # sink gets one TokenEvent per token; the last has `finish`
    scheduler.cancel(ticket)                            # e.g. the client went away: the row leaves at the next step
    scheduler.close()

How it runs. Rows are grouped into *lanes*, one per distinct set of depth options (``loops``, ``exit``,
``max_loops``, ``kv_policy``, ...): a lane is one :class:`~parcae.inference.engine.Engine` and one KV cache of
``max_rows`` fixed slots, each slot the full context long. Depth options change the forward itself (how many
iterations, whether and how tokens exit, what the cache keeps), so rows with different options cannot share a
forward; a step runs one forward per lane that has work. Every step:

1. drops cancelled rows (their slot is released: :meth:`LoopKVCache.release` forgets its entries);
2. admits queued requests, first come first served, while fewer than ``max_rows`` rows run (over all lanes);
3. prefills each new row's prompt but its last token into its slot, ``prefill_chunk`` tokens per step, so a long
   prompt is spread over several steps instead of stalling every other row for its whole length;
4. runs one decode step for every row whose prompt is in: the last token of each row goes through
   :meth:`Engine.forward` at the row's own column and position (``real`` is False for idle slots), the next
   token is drawn with :func:`~parcae.inference.engine.sample` from the row's own generator, and a row that hit
   a stop id or its token limit leaves at once, freeing its slot for the next request.

A row's numbers are the ones :meth:`Engine.stream` gives the same prompt alone: each slot holds one sequence from
column 0 (so column = position), the initial-state noise is that of sequence 0, and the sampling generator is
seeded with :func:`~parcae.inference.engine.generator_seed` of (seed, 0). Nothing a request asks for can fail
another: the caller validates a job before submitting it, and an exception in a lane's forward fails that lane's
rows only (the lane is rebuilt for the next request).
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from parcae.model import LoopedLM
from parcae.model.loss import real_logits
from parcae.model.state import positional_noise

from .engine import Engine, Sampling, generator_seed, sample


class Overloaded(RuntimeError):
    """The queue is full: the request is refused now rather than left waiting without bound (HTTP 429)."""


@dataclass
class Job:
    """What one request asks for. ``depth`` holds :class:`Engine` keyword arguments (loops, exit, min_loops,
    max_loops, kv_policy, continuous). ``logprobs``: None reports none; 0 the chosen token's log-probability (with
    an empty top list, as OpenAI answers ``logprobs: 0``); N > 0 also the top N."""
    prompt: list[int]
    max_new_tokens: int
    depth: dict = field(default_factory=dict)
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

    @property
    def decoding(self) -> bool:
        return self.fed == len(self.job.prompt) - 1


class _Lane:
    """One engine (one set of depth options) and its KV cache of fixed slots."""

    def __init__(self, engine: Engine, slots: int, capacity: int) -> None:
        self.engine, self.capacity = engine, capacity
        self.cache = engine.new_cache(slots, capacity)
        self.rows: list[Optional[_Row]] = [None] * slots
        self.token = [0] * slots    # the token each slot feeds at the next decode step
        cfg = engine.config
        dtype = next(engine.model.parameters()).dtype
        self.state = (torch.zeros(slots, 1, cfg.d_model, device=engine.device, dtype=dtype)
                      if engine.continuous else None)   # warm start: the previous token's final state per slot

    def free_slot(self) -> Optional[int]:
        return next((i for i, r in enumerate(self.rows) if r is None), None)

    def live(self) -> list[_Row]:
        return [r for r in self.rows if r is not None]


def _depth_key(depth: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in depth.items()))


class Scheduler:
    def __init__(self, model: LoopedLM, *, max_rows: int = 8, stop_ids: Sequence[int] = (),
                 prefill_chunk: int = 256, max_queue: Optional[int] = None) -> None:
        """At most ``max_queue`` (default 4 x max_rows) requests wait, beyond which :meth:`submit` raises
        :class:`Overloaded`."""
        max_queue = 4 * max_rows if max_queue is None else max_queue
        if max_rows < 1 or prefill_chunk < 1 or max_queue < 1:
            raise ValueError(f"max_rows, prefill_chunk and max_queue must be >= 1, got {max_rows}, {prefill_chunk}, "
                             f"{max_queue}")
        self.model, self.max_rows, self.prefill_chunk = model, max_rows, prefill_chunk
        self.max_queue = max_queue
        self.stop_ids = set(int(s) for s in stop_ids)
        self.capacity = model.config.block_size
        self.vocab_size = model.config.vocab_size
        self.device = next(model.parameters()).device
        self._lanes: dict[tuple, _Lane] = {}
        self._queue: deque[_Row] = deque()
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._closed = False
        self._thread: Optional[threading.Thread] = None
        self.counts = {"submitted": 0, "admitted": 0, "finished": 0, "cancelled": 0, "failed": 0, "steps": 0,
                       "refused": 0}

    # -- the caller's side (any thread) ----------------------------------------------------------------------
    def submit(self, job: Job, sink: Callable[[TokenEvent], None]) -> Ticket:
        """Queue a validated job; ``sink`` is called from the scheduler's thread with each event (keep it quick)."""
        if job.max_new_tokens < 1 or not job.prompt:
            raise ValueError("a job needs a prompt and max_new_tokens >= 1")
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
                    "max_rows": self.max_rows, "max_queue": self.max_queue, "running": self.running}

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
        while True:
            with self._cond:
                active = sum(len(lane.live()) for lane in self._lanes.values())
                if not self._queue or active >= self.max_rows:
                    return
                row = self._queue.popleft()
            if row.ticket.cancelled:
                self._end(row, TokenEvent(None, finish="cancelled"), "cancelled")
                continue
            key = _depth_key(row.job.depth)
            lane = self._lanes.get(key)
            if lane is None:
                try:
                    lane = self._lanes[key] = _Lane(Engine(self.model, **row.job.depth), self.max_rows,
                                                    self.capacity)
                except Exception as err:
                    self._end(row, TokenEvent(None, finish="error", error=f"{type(err).__name__}: {err}"), "failed")
                    continue
            row.slot = lane.free_slot()
            lane.rows[row.slot] = row
            lane.token[row.slot] = row.job.prompt[-1]
            self.counts["admitted"] += 1
            if len(row.job.prompt) == 1 and lane.state is not None:  # no earlier token: the initial noise
                lane.state[row.slot] = self._noise(lane.engine, 0)

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

    def _decode(self, lane: _Lane) -> None:
        rows = [r for r in lane.live() if r.decoding]
        if not rows:
            return
        B, dev = len(lane.rows), self.device
        alive = torch.zeros(B, dtype=torch.bool)
        cols = torch.zeros(B, dtype=torch.long)
        for r in rows:
            alive[r.slot], cols[r.slot] = True, r.fed + r.generated
        slots = sorted(r.slot for r in rows)
        max_col = int(cols[slots].max())
        alive, cols = alive.to(dev), cols.to(dev)[:, None]
        tokens = torch.tensor(lane.token, dtype=torch.long, device=dev)[:, None]
        engine = lane.engine
        out = engine.forward(lane.cache, tokens, cols, cols, alive[:, None], torch.zeros(B, dtype=torch.long,
                             device=dev), adaptive=engine.adaptive, initial_state=lane.state, rows=slots,
                             max_col=max_col)
        logits = out.logits[:, -1]
        nxt = torch.zeros(B, dtype=torch.long, device=dev)
        groups: dict[tuple, list[_Row]] = {}
        for r in rows:
            s = r.job.sampling
            groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(r)
        for group in groups.values():
            slots = torch.tensor([r.slot for r in group], device=dev)
            nxt[slots] = sample(logits[slots], group[0].job.sampling, [r.generator for r in group], self.vocab_size)
        reported = [r for r in rows if r.job.logprobs is not None]
        lp_rows = None
        if reported:
            slots = torch.tensor([r.slot for r in reported], device=dev)
            logp = torch.log_softmax(real_logits(logits[slots], self.vocab_size), -1)
            top = torch.topk(logp, min(max(r.job.logprobs for r in reported), self.vocab_size), -1)
            chosen = logp.gather(1, nxt[slots][:, None])[:, 0]
            lp_rows = (chosen.tolist(), top.values.tolist(), top.indices.tolist())
        tokens_now, depths = nxt.tolist(), out.depth[:, -1].tolist()   # the step's one device -> host read
        if lane.state is not None:
            lane.state = torch.where(alive[:, None, None], out.state, lane.state)
        self.counts["steps"] += 1
        for r in rows:
            t = tokens_now[r.slot]
            r.generated += 1
            event = TokenEvent(t, depths[r.slot])
            if lp_rows is not None and r.job.logprobs is not None:
                i = reported.index(r)
                event.logprob = lp_rows[0][i]
                event.top = list(zip(lp_rows[2][i][: r.job.logprobs], lp_rows[1][i][: r.job.logprobs]))
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
