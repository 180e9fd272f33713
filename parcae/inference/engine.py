"""KV-cached generation and scoring for Parcae, the RDM and the GPT, at fixed or adaptive depth (plain PyTorch).

    from parcae.inference import Engine, Sampling
    engine = Engine(model, exit="kl", max_loops=32, kv_policy="latest")          # or Engine(model, loops=8)
    for event in engine.stream([[bos, *prompt_ids]], max_new_tokens=64, sampling=Sampling(temperature=0.8)):
        ...                                                                        # one token per row per event
    result = engine.generate([[bos, *ids_a], [bos, *ids_b]], max_new_tokens=64)    # batched, each row stops alone
    nll, depth = engine.score([[bos, *ids]])                                       # teacher forced, per token

How a step runs: the model's own blocks compute every token (``Block.forward(..., cache=view)``); the engine only
decides which cache store each attention layer reads and writes (:mod:`parcae.inference.cache`) and when a token
leaves the loop (:mod:`parcae.inference.exits`). A prompt is prefilled in one chunk at the full depth (``loops``,
or ``max_loops`` with an exit rule) except its last token, which goes through the same per-token step as every
generated token, so the first new token's depth also follows the exit rule.

Every token of ``stream``, of the server's scheduler and of a speculative draft comes from one function,
:func:`decode_step` (engine, cache, the step's inputs, per-row sampling settings and generators -> tokens, depths,
logits, log-probabilities, read back in one device -> host read), and every token is drawn by the rules of
:func:`sample` (:func:`sampling_probs` then :func:`sample_from_probs`, each row from its own generator).

The initial state h₀ of a token is :func:`parcae.model.state.positional_noise` of (seed, sequence, position), the
same numbers the model's eval forward draws, so at a fixed loop count the cached logits equal the full forward.
``continuous=True`` instead starts a generated token from the previous token's final state (warm start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from parcae.model import LoopedLM
from parcae.model.loss import real_logits, token_nll
from parcae.model.state import positional_noise

from parcae.model.loop import Uniform, pick, put

from .cache import KVPolicy, LoopKVCache
from .exits import ExitRule
from .options import DepthOptions


@dataclass
class Sampling:
    """temperature 0 is greedy; top_k / top_p restrict the candidates before sampling."""
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass
class StepEvent:
    """One generated token per row (``tokens[i]`` is meaningless where ``active[i]`` is False)."""
    index: int
    tokens: list[int]
    depths: list[int]
    active: list[bool]     # the row produced a token at this step
    finished: list[bool]   # the row is done after this step (stop token or limit)
    logits: Optional[Tensor] = None  # [B, V] fp32 logits the tokens were drawn from
    # self-speculative decoding: each row's counts so far (None without --speculate)
    speculation: Optional[list["SpeculationStats"]] = None


@dataclass(frozen=True)
class SpeculationStats:
    """What self-speculative decoding did for a row (or, added up, a batch): rounds it took part in, tokens drafted
    and drafts accepted."""
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0

    def __add__(self, other: "SpeculationStats") -> "SpeculationStats":
        return SpeculationStats(self.rounds + other.rounds, self.drafted + other.drafted,
                                self.accepted + other.accepted)

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)   # generated ids (a stop token included, if one was hit)
    depths: list[int] = field(default_factory=list)   # loops used for each generated token
    stopped: bool = False                              # ended on a stop token (not on the limit)
    speculation: Optional[SpeculationStats] = None     # with --speculate: this row's rounds, drafts, acceptances


@dataclass
class _Start:
    """A batch laid out in cache columns with its prompts prefilled: the first step reads ``tokens`` at ``cols``."""
    B: int
    cache: LoopKVCache
    seq_ids: Tensor
    sequences: list[int]
    limits: list[int]
    cols: list[int]          # column of each row's next input token
    positions: list[int]     # its position in the row's sequence
    tokens: Tensor           # [B, 1] the next input tokens (each prompt's last)
    state: Optional[Tensor]  # [B, 1, d] warm-start state (continuous) or None


@dataclass
class _Forward:
    logits: Optional[Tensor]  # [B, S, V] fp32 (zeros in rows that were not computed)
    depth: Tensor             # [B, S] loops whose state produced the output
    state: Optional[Tensor]   # [B, S, d] the state read out (looped models)


class _ExitSchedule:
    """The adaptive step's policy, handed to the model's loop (:mod:`parcae.model.loop`): after the checked
    iterations (min_loops, min_loops + exit_every, ...; Huginn's min_steps + 1 and check_criterion_every_n_steps) the
    exit rule decides per token, and at max_loops every token stops; a token's output is its state (and logits) at
    its exit. Under ``latest`` / ``ring`` an exited token stops computing and a row with no token left computing
    leaves the batch (one device read per check says which rows stay); under ``full`` every token computes all
    iterations (no read at all). Between checks nothing is read out: no coda, no head, no read."""

    first = 0

    def __init__(self, engine: "Engine", real: Tensor, dense: bool = False, compact: bool = True) -> None:
        """``compact`` False (the compiled step, :mod:`parcae.inference.compiled`): no device read at all; a row
        whose tokens all exited keeps running the iterations without storing anything (the same outputs and
        cache entries, none of the compute saved; the engine's iteration count still adds each token's depth)."""
        self.compact = compact
        self.iterations, self.min_loops, self.rule = engine.max_loops, engine.min_loops, engine.exit
        self.every = engine.exit_every
        self.vocab_size, self.counter, self.readouts = engine.config.vocab_size, engine._iterations, engine._readouts
        self.keep_computing = engine.policy.kind == "full"
        self.real = real
        # one token a row, every one real (a decode step): every row still computing is deciding, so the tokens
        # that store keys/values are all of the computing rows' (no write mask)
        self.dense = dense and real.shape[1] == 1
        self.deciding = real.clone()      # output not yet fixed
        # still iterating (storing their keys/values): the deciding tokens, or under full every real token
        self.computing = real if self.keep_computing else None
        self.active: Optional[Tensor] = None   # rows still computing (None: all)
        self.finished = False
        self.ran = 0  # iterations run so far
        self.depth = torch.full(real.shape, self.iterations, dtype=torch.long, device=real.device)
        self.tracker = self.h_out = None
        # each token's logits at its exit (an output rule reads them out at the checks; a state rule reads the exit
        # states out once, after the loop)
        self.logits_out = torch.zeros(*real.shape, engine.config.padded_vocab_size, device=real.device) \
            if self.rule.needs_logits else None

    def rows(self, t: int) -> Optional[Tensor]:
        return self.active

    def writes(self, t: int) -> Optional[Tensor]:
        if self.dense:  # (under full every real token computes; otherwise a row computes while its token decides)
            return None
        return self.computing if self.keep_computing else pick(self.deciding, self.active)

    def start(self, h0: Tensor, output: Optional[Tensor] = None) -> None:
        """The loop begins at h₀ [B, S, d]: the rule's tracker starts from it, and every token's output is h₀ (or
        ``output``, an equal tensor of its own) until the token stops."""
        self.tracker, self.h_out = self.rule.start(h0, self.vocab_size), h0 if output is None else output

    def done(self, t: int, h_before: Tensor, h: Tensor, rows: Optional[Tensor], read_out) -> None:
        if self.tracker is None:  # t = 0, every row: h_before is h₀
            self.start(h_before)
        self.ran = t + 1
        last, n = t + 1 == self.iterations, t + 1 - self.min_loops
        if not last and (n < 0 or n % self.every):
            return  # not a checked iteration
        # the state rules compare with the previous iteration's state when that was the previous check
        consecutive = self.every == 1 and t + 1 > self.min_loops
        self.check(t + 1, h_before if consecutive else None, h, rows, read_out, last)

    def check(self, depth: int | Tensor, h_before: Optional[Tensor], h: Tensor, rows: Optional[Tensor], read_out,
              last: bool) -> None:
        """The exit check of rows ``rows`` (None: all) after ``depth`` iterations (an int, or a 0-d tensor in the
        compiled segments of :mod:`parcae.inference.compiled`): the rule decides, the stopping tokens record their
        state, logits and depth; ``last`` stops every token. ``h_before``: the state before this iteration when
        the previous check was the previous iteration (:meth:`ExitTracker.update`)."""
        deciding = pick(self.deciding, rows)
        # (the coda stores the entries of the deciding tokens: under full some computing tokens have decided)
        logits = read_out(h, None if self.dense and not self.keep_computing else deciding) \
            if self.rule.needs_logits else None
        if logits is not None:  # the read-out ran on every row still computing
            self.readouts += (self.computing if self.keep_computing else deciding).sum()
        converged, _ = self.tracker.update(h, logits, rows, h_before)
        stop = deciding if last else deciding & converged
        reading = self.compact and not (self.keep_computing or last)
        if reading:  # the one device read of this iteration: which rows have a token stopping, which stay
            stopping, still = torch.stack([stop.any(-1), (deciding & ~stop).any(-1)]).tolist()
            if not any(stopping):
                return  # nothing to record, nobody leaves
        self.h_out = put(self.h_out, rows, torch.where(stop[..., None], h, pick(self.h_out, rows)))
        self.depth = put(self.depth, rows, torch.where(stop, depth, pick(self.depth, rows)))
        if logits is not None:
            self.logits_out = put(self.logits_out, rows,
                                  torch.where(stop[..., None], logits, pick(self.logits_out, rows)))
        self.deciding = put(self.deciding, rows, deciding & ~stop)
        if not reading or all(still):
            return
        keep = [i for i, s in enumerate(still) if s]
        self.finished = not keep
        index = torch.tensor(keep, dtype=torch.long, device=h.device)
        self.active = index if rows is None else rows.index_select(0, index)

    def output(self, h: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        # (token, iteration) pairs computed: under full every real token ran every iteration; otherwise a token
        # computed exactly its depth (counted once here, not per iteration)
        self.counter += self.real.sum() * self.ran if self.keep_computing else torch.where(self.real, self.depth, 0).sum()
        return self.h_out, self.logits_out


class Engine:
    def __init__(self, model: LoopedLM, *, loops: Optional[int] = None, exit: Optional[str | ExitRule] = None,
                 min_loops: int = 1, max_loops: Optional[int] = None, kv_policy: Optional[str | KVPolicy] = None,
                 continuous: bool = False, seed: int = 0, exit_every: int = 1,
                 speculate: Optional[str | tuple[int, int]] = None, compile: bool = False) -> None:
        """Fixed depth (``loops``, default μ_rec) or an exit rule. The defaults are the ones that save compute:
        with an exit rule, ``max_loops`` = μ_rec (Huginn also caps at μ), KV policy ``latest`` (an exited token
        stops computing) and the prompt runs at min(μ_rec, max_loops) (at ``max_loops`` under ``full``, where
        every entry must exist). The depth arguments are checked and completed by :meth:`DepthOptions.resolved`
        (``self.options``). ``speculate`` = (draft loops, k) or "D:K": self-speculative decoding at the fixed
        depth (see :mod:`parcae.inference.speculative`). ``compile``: one token per row through ``torch.compile``
        with static shapes (:mod:`parcae.inference.compiled`); the same tokens, compiled on first use."""
        cfg = model.config
        self.model, self.config, self.seed = model, cfg, seed
        self.options = DepthOptions(loops=loops, exit=exit, min_loops=min_loops, max_loops=max_loops,
                                    exit_every=exit_every, kv_policy=kv_policy, continuous=continuous).resolved(cfg)
        o = self.options
        self.exit = ExitRule.parse(o.exit) if isinstance(o.exit, str) else o.exit
        self.policy = KVPolicy.parse(o.kv_policy)
        self.continuous, self.min_loops, self.exit_every = o.continuous, o.min_loops, o.exit_every
        self.loops = o.loops if o.loops is not None else cfg.mean_recurrence
        self.max_loops = o.max_loops
        from .speculative import parse_speculate  # (it builds on this module)
        self.speculate = parse_speculate(speculate, self) if speculate is not None else None
        self.device = next(model.parameters()).device
        # (token, iteration) pairs computed by the recurrent blocks, and tokens read out through C, the coda and the
        # head (once per token, or per check with an output-based exit rule), for accounting; kept on the device
        self._iterations = torch.zeros((), dtype=torch.long, device=self.device)
        self._readouts = torch.zeros((), dtype=torch.long, device=self.device)
        self.compiled = None
        if compile:
            from .compiled import CompiledStep  # (it builds on this module)
            self.compiled = CompiledStep(self)

    @classmethod
    def from_options(cls, model: LoopedLM, options: DepthOptions, *, seed: int = 0,
                     speculate: Optional[str | tuple[int, int]] = None, compile: bool = False) -> "Engine":
        """The engine for ``model`` at the depth ``options`` (resolved here if they are not yet)."""
        return cls(model, seed=seed, speculate=speculate, compile=compile, **options.as_kwargs())

    def count(self, iterations: int = 0, readouts: int = 0) -> None:
        """Add (token, iteration) pairs and read-outs computed outside :meth:`forward` (depth-level batching)."""
        if iterations:
            self._iterations += iterations
        if readouts:
            self._readouts += readouts

    @property
    def iterations_run(self) -> int:
        return int(self._iterations)

    @property
    def readouts_run(self) -> int:
        """Tokens read out to logits through C, the coda and the head (a prompt's prefill, which runs C and the
        coda for their cache entries but not the head, is not counted)."""
        return int(self._readouts)

    @property
    def adaptive(self) -> bool:
        return self.exit is not None

    @property
    def prefill_loops(self) -> int:
        """The depth of the prompt chunk (every prompt token but the last)."""
        if not self.adaptive:
            return self.loops
        return self.max_loops if self.policy.kind == "full" else min(self.config.mean_recurrence, self.max_loops)

    def new_cache(self, batch_size: int, capacity: int) -> LoopKVCache:
        if self.compiled is not None:  # static shapes: rows and columns padded to buckets
            return self.compiled.new_cache(batch_size, capacity)
        dtype = next(self.model.parameters()).dtype
        return LoopKVCache(self.config, batch_size, capacity, self.policy, self.adaptive, self.device, dtype)

    # -- one chunk of tokens ---------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, cache: LoopKVCache, tokens: Tensor, cols: Tensor, positions: Tensor, real: Tensor,
                sequences: Tensor, adaptive: bool, initial_state: Optional[Tensor] = None,
                need_logits: bool = True, rows: Optional[Sequence[int]] = None,
                max_col: Optional[int] = None, loops: Optional[int] = None, first_loop: int = 0,
                dense: bool = False) -> _Forward:
        """Run tokens [B, S] (at columns cols, positions positions; ``real`` False for padding) through the model's
        cached step, storing their keys/values; ``adaptive`` applies the exit rule per token, else a fixed depth.

        Only rows with a real token are computed; the others cost nothing and get zero logits and depth. ``rows``
        (host-side row numbers, if the caller knows them) names those rows without reading ``real`` back from the
        device; ``max_col`` (the largest column) likewise spares a read. At a fixed depth, ``loops`` overrides the
        engine's and ``first_loop`` > 0 continues tokens whose ``initial_state`` already ran that many iterations.
        ``dense``: the caller knows that every token of ``rows`` is real (a decode step), so the cache stores them
        without masks (no read-modify-write) and the counts need no device reduction."""
        B, S = tokens.shape
        if self.compiled is not None and self.compiled.handles(cache, tokens, adaptive and self.config.looped,
                                                               need_logits):
            return self.compiled.forward(cache, tokens, cols, positions, real, sequences, adaptive, initial_state,
                                         rows, max_col, loops, first_loop)
        if rows is None:
            rows = [b for b, any_real in enumerate(real.any(1).tolist()) if any_real]
        index = None
        if rows is not None and len(rows) < B:
            index = torch.tensor(list(rows), dtype=torch.long, device=tokens.device)
            tokens, cols, positions, real, sequences, initial_state = (
                pick(x, index) for x in (tokens, cols, positions, real, sequences, initial_state))
        if tokens.shape[0] == 0:
            return _Forward(torch.zeros(B, S, self.config.padded_vocab_size, device=tokens.device) if need_logits
                            else None, torch.zeros(B, S, dtype=torch.long, device=tokens.device), None)
        write = None if dense else real  # the tokens that store keys/values (None: all)
        n_real = tokens.numel() if dense else real.sum()
        cache.begin(cols, write, index, max_col)
        if adaptive and self.config.looped:
            schedule = _ExitSchedule(self, real, dense)
        else:
            schedule = Uniform((loops or self.prefill_loops) if self.config.looped else 1, write, first_loop)
            self._iterations += n_real * (schedule.iterations - first_loop) if self.config.looped else 0
        with torch.inference_mode():  # the model's many small ops skip autograd's bookkeeping (~10% of a decode step)
            out = self.model.step(tokens, schedule=schedule, positions=positions, cache=cache, real=write,
                                  initial_state=initial_state, state_seed=self.seed, sequences=sequences,
                                  need_logits=need_logits)
        if out.logits is not None and not (isinstance(schedule, _ExitSchedule) and schedule.logits_out is not None):
            self._readouts += n_real  # the model read the final states out once
        depth = schedule.depth if isinstance(schedule, _ExitSchedule) else \
            torch.full(tokens.shape, schedule.iterations, dtype=torch.long, device=tokens.device)
        logits, state = out.logits, out.state
        if index is not None:  # back to the whole batch
            depth = torch.zeros(B, S, dtype=torch.long, device=depth.device).index_copy(0, index, depth)
            logits = None if logits is None else \
                torch.zeros(B, *logits.shape[1:], device=logits.device).index_copy(0, index, logits)
            state = None if state is None else \
                torch.zeros(B, *state.shape[1:], dtype=state.dtype, device=state.device).index_copy(0, index, state)
        elif logits is not None:  # the caller's (StepEvent.logits): an ordinary tensor, not an inference-mode one
            logits = logits.clone()
        return _Forward(logits, depth, state)

    # -- generation ------------------------------------------------------------------------------------------
    def check_request(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
        if not prompts:
            raise ValueError("no prompts given")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} has no tokens (start it with the BOS token)")
            if len(p) + max_new_tokens > self.config.block_size:
                raise ValueError(f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} that exceeds "
                                 f"the model's context of {self.config.block_size} tokens (shorten the prompt or "
                                 "generate fewer tokens)")
            bad = [t for t in p if not 0 <= int(t) < self.config.vocab_size]
            if bad:
                raise ValueError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {self.config.vocab_size})")

    @torch.no_grad()
    def stream(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
               sampling: Sampling | Sequence[Sampling] = Sampling(), stop_ids: Sequence[int] = (),
               padding: str = "left", sequences: Optional[Sequence[int]] = None,
               limits: Optional[Sequence[int]] = None, halt: Optional[set] = None) -> Iterator[StepEvent]:
        """Generate for every prompt at once, one :class:`StepEvent` per step, until each row hits a stop id or
        its token limit (``limits[i]``, default ``max_new_tokens``). ``sequences`` names each row's sequence for its
        initial-state noise and sampling stream (default 0 for every row, so a row gives the same tokens alone or
        in any batch). ``sampling`` may be one setting or one per row. Rows the caller adds to ``halt`` (e.g. on a
        stop string) end after the current step. A finished row costs nothing in later steps, and a step reads
        back from the device once at a fixed depth (the sampled ids), at most once per iteration with an exit rule.
        """
        if padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
        self.check_request(prompts, max_new_tokens)
        if max_new_tokens == 0:
            return
        if self.speculate is not None:
            from .speculative import speculative_stream
            yield from speculative_stream(self, prompts, max_new_tokens, sampling, stop_ids, padding, sequences,
                                          limits, halt)
            return
        dev = self.device
        start = self.start(prompts, max_new_tokens, padding, sequences, limits)
        B, cache, seq_ids, limit = start.B, start.cache, start.seq_ids, start.limits
        prev_state, col_host = start.state, list(start.cols)
        col, pos = torch.tensor(start.cols, device=dev), torch.tensor(start.positions, device=dev)
        step_tokens = start.tokens[:, 0]
        alive = [n > 0 for n in limit]
        per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * B
        generators = row_generators(per_row, start.sequences, dev)
        stops = set(int(t) for t in stop_ids)
        for i in range(max_new_tokens):
            rows = [b for b in range(B) if alive[b]]
            step = decode_step(self, cache, step_tokens, col, pos, seq_ids, rows, max(col_host[b] for b in rows),
                               per_row, generators, initial_state=prev_state)
            step.raise_errors()
            ids, depths, _ = step.read()
            finished = [alive[b] and (ids[b] in stops or i + 1 >= limit[b]) for b in range(B)]
            yield StepEvent(i, ids, depths, list(alive), [f or not a for f, a in zip(finished, alive)], step.logits)
            alive = [a and not f for a, f in zip(alive, finished)]
            for b in halt or ():
                alive[b] = False
            if not any(alive):
                return
            if self.continuous:
                prev_state = step.state
            step_tokens, col, pos = step.tokens, col + 1, pos + 1
            col_host = [c + 1 for c in col_host]

    def start(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, padding: str = "left",
              sequences: Optional[Sequence[int]] = None, limits: Optional[Sequence[int]] = None,
              extra_columns: int = 0) -> "_Start":
        """Lay the prompts out in cache columns and prefill all but each one's last token (the first step's input)."""
        dev = self.device
        B, W = len(prompts), max(len(p) for p in prompts)
        lengths = [len(p) for p in prompts]
        seq_list = list(sequences) if sequences is not None else [0] * B
        if len(seq_list) != B:
            raise ValueError(f"{len(seq_list)} sequence ids for {B} prompts")
        limit = list(limits) if limits is not None else [max_new_tokens] * B
        if len(limit) != B or any(not 0 <= n <= max_new_tokens for n in limit):
            raise ValueError(f"limits must give each of the {B} rows a count in [0, max_new_tokens]")
        tokens = torch.zeros(B, W, dtype=torch.long)
        real = torch.zeros(B, W, dtype=torch.bool)
        starts = [W - n if padding == "left" else 0 for n in lengths]
        for b, p in enumerate(prompts):
            tokens[b, starts[b]:starts[b] + lengths[b]] = torch.tensor(list(p))
            real[b, starts[b]:starts[b] + lengths[b]] = True
        last_col = [starts[b] + lengths[b] - 1 for b in range(B)]
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        cols = torch.arange(W).expand(B, W)
        prefill = real & (cols != torch.tensor(last_col)[:, None])
        tokens, real, positions, cols, prefill = (x.to(dev) for x in (tokens, real, positions, cols, prefill))
        seq_ids = torch.tensor(seq_list, device=dev, dtype=torch.long)
        cache = self.new_cache(B, W + max_new_tokens + extra_columns)
        prev_state = None
        prefilled = [b for b in range(B) if lengths[b] > 1]
        if prefilled:  # every token but each prompt's last, in one chunk (the columns before the last last one)
            width = max(last_col)
            out = self.forward(cache, tokens[:, :width], cols[:, :width], positions[:, :width], prefill[:, :width],
                               seq_ids, adaptive=False, need_logits=False, rows=prefilled, max_col=width - 1)
            if self.continuous:
                before_last = torch.tensor([max(c - 1, 0) for c in last_col], device=dev)
                prev_state = out.state.gather(1, before_last[:, None, None].expand(B, 1, self.config.d_model))
                first = torch.tensor([n == 1 for n in lengths], device=dev)
                prev_state = torch.where(first[:, None, None], self._noise(seq_ids, torch.tensor(lengths, device=dev) - 1),
                                         prev_state)
        step_tokens = tokens.gather(1, torch.tensor(last_col, device=dev)[:, None])
        return _Start(B, cache, seq_ids, seq_list, limit, last_col, [n - 1 for n in lengths], step_tokens, prev_state)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling | Sequence[Sampling] = Sampling(), stop_ids: Sequence[int] = (),
                 padding: str = "left", sequences: Optional[Sequence[int]] = None) -> list[Generation]:
        """:meth:`stream`'s tokens gathered per row (with speculation, each row's :class:`SpeculationStats`). With
        an exit rule and several prompts on an accelerator the rows decode in depth-level ticks
        (:mod:`parcae.inference.depth_batching`: a row whose token exits early goes on to its next token while the
        others still loop; :func:`~parcae.inference.depth_batching.default_gather` says where), the same tokens."""
        if self.adaptive and len(prompts) > 1:
            from . import depth_batching  # (it builds on this module)
            gather = depth_batching.default_gather(self)
            if gather and depth_batching.supports(self):
                return depth_batching.generate(self, prompts, max_new_tokens, sampling, stop_ids, padding, sequences,
                                               gather)
        results = [Generation(speculation=SpeculationStats() if self.speculate else None) for _ in prompts]
        for event in self.stream(prompts, max_new_tokens, sampling, stop_ids, padding, sequences):
            for b, r in enumerate(results):
                if event.active[b]:
                    r.tokens.append(event.tokens[b])
                    r.depths.append(event.depths[b])
                    r.stopped = event.tokens[b] in stop_ids
                if event.speculation is not None:
                    r.speculation = event.speculation[b]
        return results

    def _noise(self, sequences: Tensor, positions: Tensor) -> Tensor:
        return positional_noise(self.seed, sequences, positions[:, None], self.config.d_model, self.config.state_std,
                                next(self.model.parameters()).dtype)

    # -- teacher forcing -------------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, rows: Sequence[Sequence[int]], sequences: Optional[Sequence[int]] = None
              ) -> tuple[list[list[float]], list[list[int]]]:
        """Teacher-forced NLL (nats) of each row's tokens 1.. given the ones before, and the loops each prediction
        used. With an exit rule every token is its own step (its depth is its own); at a fixed depth the rows are
        one chunk (the same numbers, faster)."""
        dev = self.device
        B, W = len(rows), max(len(r) for r in rows)
        if min(len(r) for r in rows) < 2:
            raise ValueError("every row needs at least 2 tokens to score")
        tokens = torch.zeros(B, W, dtype=torch.long, device=dev)
        real = torch.zeros(B, W, dtype=torch.bool, device=dev)
        for b, r in enumerate(rows):
            tokens[b, : len(r)] = torch.tensor(list(r), device=dev)
            real[b, : len(r)] = True
        seq_ids = torch.tensor(list(sequences) if sequences is not None else [0] * B, device=dev, dtype=torch.long)
        cache = self.new_cache(B, W)
        targets = tokens[:, 1:]
        if not self.adaptive and not self.continuous:
            cols = torch.arange(W - 1, device=dev).expand(B, W - 1)
            out = self.forward(cache, tokens[:, :-1], cols, cols, real[:, :-1] & real[:, 1:], seq_ids, adaptive=False,
                               max_col=W - 2)
            logits, depth = out.logits, out.depth
        else:
            logits, depth, prev = [], [], None
            for c in range(W - 1):
                live = [b for b in range(B) if len(rows[b]) > c + 1]
                col = torch.full((B, 1), c, device=dev, dtype=torch.long)
                out = self.forward(cache, tokens[:, c:c + 1], col, col, real[:, c + 1:c + 2], seq_ids,
                                   adaptive=self.adaptive, initial_state=prev, rows=live, max_col=c)
                logits.append(out.logits)
                depth.append(out.depth)
                prev = out.state if self.continuous else None
            logits, depth = torch.cat(logits, 1), torch.cat(depth, 1)
        nll = token_nll(logits, targets, self.config.vocab_size)
        n = [len(r) - 1 for r in rows]
        return [nll[b, : n[b]].tolist() for b in range(B)], [depth[b, : n[b]].tolist() for b in range(B)]


def generator_seed(seed: int, sequence: int) -> int:
    """The seed of one row's sampling generator: (seed, sequence) mixed into torch's range [0, 2**64), so no seed
    overflows (``manual_seed`` refuses 2**64 and above) and small seeds keep the numbers they always gave."""
    return (int(seed) * 1_000_003 + int(sequence)) % 2**64


def row_generators(samplings: Sequence[Sampling], sequences: Sequence[int], device) -> list[torch.Generator]:
    """One sampling generator per row, seeded by (its sampling seed, its sequence): a row draws the same numbers
    alone or in any batch."""
    return [torch.Generator(device=device).manual_seed(generator_seed(s.seed, int(q)))
            for s, q in zip(samplings, sequences)]


def sample(logits: Tensor, sampling: Sampling, generators: Sequence[torch.Generator], vocab_size: int,
           alive: Optional[Sequence[bool]] = None) -> Tensor:
    """Next token per row from logits [B, V]: greedy at temperature 0, else temperature / top-k / top-p sampling,
    each row from its own generator (so a row's draws do not depend on the other rows). ``alive`` (host-side, one
    bool per row) skips the rows that draw nothing."""
    if sampling.temperature == 0:
        return real_logits(logits, vocab_size).argmax(-1)
    return sample_from_probs(sampling_probs(logits, sampling, vocab_size), generators, alive)


def sample_from_probs(probs: Tensor, generators: Sequence[torch.Generator],
                      alive: Optional[Sequence[bool]] = None) -> Tensor:
    """One token per row drawn from the distributions ``probs`` [B, V] (:func:`sampling_probs`, or one derived
    from it such as speculative decoding's residual), one draw from each row's own generator; rows with ``alive``
    False draw nothing (and get 0)."""
    out = torch.zeros(probs.shape[0], dtype=torch.long, device=probs.device)
    for b, g in enumerate(generators):
        if alive is None or bool(alive[b]):
            out[b] = torch.multinomial(probs[b], 1, generator=g)[0]
    return out


def sampling_probs(logits: Tensor, sampling: Sampling, vocab_size: int) -> Tensor:
    """The distribution [B, vocab_size] a token is drawn from: one-hot on the argmax at temperature 0; else
    temperature, then top-k, then top-p, over the real vocabulary (the padded rows dropped). The row's largest
    logit is subtracted before dividing by the temperature, so a tiny temperature (1e-300) is greedy (uniform
    over exact ties), never inf/inf or 0/0 = NaN."""
    logits = real_logits(logits, vocab_size)
    if sampling.temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), vocab_size).float()
    shifted = logits - logits.amax(-1, keepdim=True)              # <= 0, the most likely token(s) at 0
    # (a temperature below fp32's range becomes 0 there: 0 / 0 would be NaN where the largest logit sits)
    logits = torch.where(shifted == 0, 0.0, shifted / sampling.temperature)
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        before = probs.cumsum(-1) - probs          # mass of the strictly more likely tokens
        drop = before >= sampling.top_p            # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.softmax(logits, -1)


# -- the decode step ---------------------------------------------------------------------------------------------
@dataclass
class TokenLogprobs:
    """The chosen token's log-probability under the model's distribution (before temperature / top-k / top-p) and
    the ``top`` most likely (token, log-probability) pairs (empty when 0 were asked for)."""
    chosen: float
    top: list[tuple[int, float]]


@dataclass
class DecodeStep:
    """One decode step of a batch, on the device until :meth:`read` (rows that did not decode hold 0)."""
    tokens: Tensor                 # [B] the drawn ids
    depth: Tensor                  # [B] loops whose state gave each row's output
    logits: Tensor                 # [B, V] fp32 logits the tokens were drawn from
    state: Optional[Tensor]        # [B, 1, d] the state read out (looped models)
    probs: Optional[Tensor]        # [B, vocab_size] the distributions drawn from (when asked for)
    errors: dict[int, str]         # rows whose sampling failed: their message (known on the host, no read)
    logprobs: Optional[Sequence[Optional[int]]] = None   # per row: None, or the top-N asked for
    _lp: Optional[tuple[Tensor, Tensor, Tensor]] = None  # chosen [B], top values [B, N], top ids [B, N]

    def raise_errors(self) -> None:
        """For a caller that has no per-row answer to fail (a plain generate call): the first row's failure."""
        if self.errors:
            b, message = next(iter(self.errors.items()))
            raise RuntimeError(f"row {b}: sampling failed: {message}")

    def read(self) -> tuple[list[int], list[int], list[Optional[TokenLogprobs]]]:
        """(ids, depths, log-probabilities per row) in the step's one device -> host read."""
        B = self.tokens.shape[0]
        parts = [self.tokens, self.depth]
        if self._lp is None:
            values = torch.stack(parts).tolist()
            return values[0], values[1], [None] * B
        chosen, top_values, top_ids = self._lp
        flat = torch.cat([torch.stack(parts).double().flatten(), chosen.double(), top_values.double().flatten(),
                          top_ids.double().flatten()]).tolist()
        N = top_values.shape[1]
        ids, depths = [int(x) for x in flat[:B]], [int(x) for x in flat[B:2 * B]]
        chosen_l, rest = flat[2 * B:3 * B], flat[3 * B:]
        values, indices = rest[:B * N], rest[B * N:]
        out: list[Optional[TokenLogprobs]] = []
        for b, n in enumerate(self.logprobs):
            out.append(None if n is None else TokenLogprobs(
                chosen_l[b], [(int(indices[b * N + j]), values[b * N + j]) for j in range(min(n, N))]))
        return ids, depths, out


@torch.no_grad()
def decode_step(engine: Engine, cache: LoopKVCache, tokens: Tensor, cols: Tensor, positions: Tensor,
                sequences: Tensor, rows: Sequence[int], max_col: int, samplings: Sequence[Sampling],
                generators: Sequence[torch.Generator], *, initial_state: Optional[Tensor] = None,
                loops: Optional[int] = None, first_loop: int = 0,
                logprobs: Optional[Sequence[Optional[int]]] = None, want_probs: bool = False) -> DecodeStep:
    """One token for each row of ``rows`` (host-side row numbers; the batch's other rows cost nothing and draw
    nothing): the input ``tokens`` [B] at cache columns ``cols`` [B] and ``positions`` [B] through the model (at
    the engine's depth: its exit rule, or ``loops`` iterations from ``first_loop`` on), then the next token drawn
    with the row's own ``samplings[b]`` and ``generators[b]`` through :func:`sample` (rows with equal settings are
    drawn together). ``logprobs[b]`` (None: not asked) adds the chosen token's log-probability and the top N;
    ``want_probs`` keeps the distributions drawn from (speculative decoding's p and q).

    The serving loops (:meth:`Engine.stream`, the scheduler, the speculative draft) call this one function. Nothing
    is read back to the host here: :meth:`DecodeStep.read` is the step's one read. A row whose sampling raises
    (a distribution torch refuses) gets 0 and its message in ``errors``; the other rows are unaffected."""
    B, dev = tokens.shape[0], tokens.device
    real = torch.zeros(B, 1, dtype=torch.bool)
    real[list(rows)] = True
    out = engine.forward(cache, tokens[:, None], cols[:, None], positions[:, None], real.to(dev), sequences,
                         adaptive=engine.adaptive and loops is None, initial_state=initial_state, rows=rows,
                         max_col=max_col, loops=loops, first_loop=first_loop, dense=True)
    return draw_step(out.logits[:, -1], out.depth[:, -1], out.state, rows, samplings, generators,
                     engine.config.vocab_size, logprobs, want_probs)


def draw_step(logits: Tensor, depth: Tensor, state: Optional[Tensor], rows: Sequence[int],
              samplings: Sequence[Sampling], generators: Sequence[torch.Generator], V: int,
              logprobs: Optional[Sequence[Optional[int]]] = None, want_probs: bool = False) -> DecodeStep:
    """The drawing half of :func:`decode_step`: from each row's logits [B, V'] (rows ``rows``; the others draw
    nothing), the next token by the row's own sampling settings and generator (rows with equal settings drawn
    together), and the log-probabilities asked for; ``depth`` [B] and ``state`` are carried into the step."""
    B, dev = logits.shape[0], logits.device
    nxt = torch.zeros(B, dtype=torch.long, device=dev)
    probs = torch.zeros(B, V, device=dev) if want_probs else None
    errors: dict[int, str] = {}
    groups: dict[tuple, list[int]] = {}
    for b in rows:
        s = samplings[b]
        groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(b)
    for group in groups.values():
        _draw_group(logits, samplings[group[0]], generators, group, V, nxt, probs, errors)
    lp = None
    if logprobs is not None and any(logprobs[b] is not None for b in rows):
        logp = torch.log_softmax(real_logits(logits, V), -1)
        n = min(max((logprobs[b] or 0) for b in rows if logprobs[b] is not None), V)
        top = torch.topk(logp, n, -1)
        lp = (logp.gather(1, nxt[:, None])[:, 0], top.values, top.indices)
    return DecodeStep(nxt, depth, logits, state, probs, errors, logprobs, lp)


def _draw_group(logits: Tensor, sampling: Sampling, generators: Sequence[torch.Generator], group: list[int],
                V: int, nxt: Tensor, probs: Optional[Tensor], errors: dict[int, str]) -> None:
    """Draw the rows of ``group`` (equal settings): their distributions together (each row alone if that
    raises), then one draw per row from its own generator; a row whose distribution or draw raises is marked in
    ``errors`` and draws nothing, the others are unaffected."""
    if sampling.temperature == 0 and probs is None:  # greedy: no distribution, no draw
        if group == list(range(logits.shape[0])):  # every row (no gather of the [B, V] logits)
            nxt.copy_(real_logits(logits, V).argmax(-1))
            return
        index = torch.tensor(group, dtype=torch.long, device=logits.device)
        nxt[index] = real_logits(logits.index_select(0, index), V).argmax(-1)
        return
    index = torch.tensor(group, dtype=torch.long, device=logits.device)
    try:
        parts = [(group, sampling_probs(logits.index_select(0, index), sampling, V))]
    except Exception:
        parts = []
        for b in group:
            try:
                parts.append(([b], sampling_probs(logits[b:b + 1], sampling, V)))
            except Exception as err:
                errors[b] = f"{type(err).__name__}: {err}"
    for members, p in parts:
        where = torch.tensor(members, dtype=torch.long, device=logits.device)
        if probs is not None:
            probs[where] = p
        if sampling.temperature == 0:
            nxt[where] = p.argmax(-1)
            continue
        for j, b in enumerate(members):
            try:
                nxt[b] = sample_from_probs(p[j:j + 1], [generators[b]])[0]
            except Exception as err:  # e.g. torch.multinomial refusing a distribution with inf / nan
                errors[b] = f"{type(err).__name__}: {err}"
