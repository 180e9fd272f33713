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

The initial state h₀ of a token is :func:`parcae.model.state.positional_noise` of (seed, sequence, position), the
same numbers the model's eval forward draws, so at a fixed loop count the cached logits equal the full forward.
``continuous=True`` instead starts a generated token from the previous token's final state (warm start).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor

from parcae.model import LoopedLM
from parcae.model.state import positional_noise

from .cache import KVPolicy, LoopKVCache
from .exits import ExitRule


@dataclass
class Sampling:
    """temperature 0 is greedy; top_k / top_p restrict the candidates before sampling."""
    temperature: float = 0.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
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


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)   # generated ids (a stop token included, if one was hit)
    depths: list[int] = field(default_factory=list)   # loops used for each generated token
    stopped: bool = False                              # ended on a stop token (not on the limit)


@dataclass
class _Forward:
    logits: Optional[Tensor]  # [B, S, V] fp32
    depth: Tensor             # [B, S] loops whose state produced the output
    state: Optional[Tensor]   # [B, S, d] the state read out (looped models)


class Engine:
    def __init__(self, model: LoopedLM, *, loops: Optional[int] = None, exit: Optional[str | ExitRule] = None,
                 min_loops: int = 1, max_loops: Optional[int] = None, kv_policy: str | KVPolicy = "full",
                 continuous: bool = False, seed: int = 0) -> None:
        cfg = model.config
        self.model, self.config, self.seed, self.continuous = model, cfg, seed, continuous
        self.policy = kv_policy if isinstance(kv_policy, KVPolicy) else KVPolicy.parse(kv_policy)
        self.exit = ExitRule.parse(exit) if isinstance(exit, str) else exit
        if not cfg.looped:
            if self.exit is not None:
                raise ValueError(f"--exit {self.exit.name}: {cfg.name} is a fixed-depth model (injection='none'); "
                                 "it has no loop to exit")
            if loops not in (None, 1):
                raise ValueError(f"loops={loops}: {cfg.name} is a fixed-depth model; it has no loops to set")
            if continuous:
                raise ValueError(f"continuous warm start needs a looped model; {cfg.name} has no recurrent state")
        for name, value in (("loops", loops), ("min_loops", min_loops), ("max_loops", max_loops)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.exit is not None and loops is not None:
            raise ValueError("give either a fixed loop count or an exit rule, not both")
        if self.exit is None and max_loops is not None and loops is None:
            loops = max_loops
        self.loops = loops if loops is not None else cfg.mean_recurrence
        self.max_loops = max_loops if max_loops is not None else (4 * cfg.mean_recurrence if self.exit else self.loops)
        self.min_loops = min_loops
        if self.exit is not None and self.max_loops < self.min_loops:
            raise ValueError(f"max_loops ({self.max_loops}) must be >= min_loops ({self.min_loops})")
        self.iterations_run = 0   # (token, iteration) pairs computed by the recurrent blocks, for accounting
        self.device = next(model.parameters()).device

    @property
    def adaptive(self) -> bool:
        return self.exit is not None

    @property
    def prefill_loops(self) -> int:
        return self.max_loops if self.adaptive else self.loops

    def new_cache(self, batch_size: int, capacity: int) -> LoopKVCache:
        dtype = next(self.model.parameters()).dtype
        return LoopKVCache(self.config, batch_size, capacity, self.policy, self.adaptive, self.device, dtype)

    # -- one chunk of tokens ---------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, cache: LoopKVCache, tokens: Tensor, cols: Tensor, positions: Tensor, real: Tensor,
                sequences: Tensor, adaptive: bool, initial_state: Optional[Tensor] = None,
                need_logits: bool = True) -> _Forward:
        """Run tokens [B, S] (at columns cols, positions positions; ``real`` False for padding) through the model,
        storing their keys/values; ``adaptive`` applies the exit rule per token, else a fixed depth."""
        m, cfg = self.model, self.config
        B, S = tokens.shape
        cache.begin(cols, real)
        rope = m._rope(int(positions.max()) + 1)[positions]        # [B, S, hd/2, 2]
        ve = m.value_embeddings_of(tokens)
        x = m.wte(tokens)
        for i, block in enumerate(m.prelude):
            x = block(x, rope, ve.get(block.index), cache.once_view(i, real))
        if not cfg.looped:
            for j, block in enumerate(m.recurrent):
                x = block(x, rope, ve.get(block.index), cache.once_view(cfg.n_prelude + j, real))
            logits = self._coda(cache, x, rope, ve, real, cfg.n_prelude + cfg.n_recurrent, need_logits)
            return _Forward(logits, torch.ones(B, S, dtype=torch.long, device=tokens.device), None)

        e = m.prelude_norm(x) if m.prelude_norm is not None else x
        drive = m.injection.input_term(e)
        if initial_state is not None:
            h = initial_state.to(e.dtype)
        elif cfg.state_init == "zero":
            h = torch.zeros_like(e)
        else:
            h = positional_noise(self.seed, sequences, positions, cfg.d_model, cfg.state_std, e.dtype)
        T = self.prefill_loops  # an adaptive engine prefills at max_loops
        running = real.clone()      # still computing iterations (their keys/values are stored)
        deciding = real.clone()     # output not yet fixed
        depth = torch.full((B, S), T, dtype=torch.long, device=tokens.device)
        h_out, logits_out = h, None
        tracker = self.exit.start(h, cfg.vocab_size) if adaptive else None
        for t in range(T):
            u = m.injection(h, drive)
            for r, block in enumerate(m.recurrent):
                u = block(u, rope, ve.get(block.index), cache.loop_view(r, t, running))
            h = torch.where(running[..., None], u, h)
            self.iterations_run += int(running.sum())
            if tracker is None or not bool(deciding.any()):
                if not bool(running.any()):
                    break
                continue
            logits = self._coda(cache, m.readout(h) if m.readout is not None else h, rope, ve, deciding,
                                cfg.n_prelude, True) if self.exit.needs_logits else None
            converged, _ = tracker.update(h, logits)
            stop = deciding & ((converged & (t + 1 >= self.min_loops)) | (t + 1 == T))
            if bool(stop.any()):
                h_out = torch.where(stop[..., None], h, h_out)
                depth = torch.where(stop, t + 1, depth)
                if logits is not None:
                    logits_out = logits if logits_out is None else torch.where(stop[..., None], logits, logits_out)
                deciding = deciding & ~stop
                if self.policy.kind != "full":
                    running = running & ~stop
            if not bool(running.any()):
                break
        if tracker is None:
            h_out = h
        if tracker is None or not self.exit.needs_logits:
            x = m.readout(h_out) if m.readout is not None else h_out
            logits_out = self._coda(cache, x, rope, ve, real, cfg.n_prelude, need_logits)
        return _Forward(logits_out, depth, h_out)

    def _coda(self, cache: LoopKVCache, x: Tensor, rope: Tensor, ve: dict, write: Tensor, first: int,
              need_logits: bool) -> Optional[Tensor]:
        for k, block in enumerate(self.model.coda):
            x = block(x, rope, ve.get(block.index), cache.once_view(first + k, write))
        return self.model.lm_head(x) if need_logits else None

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
        stop string) end after the current step."""
        if padding not in ("left", "right"):
            raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
        self.check_request(prompts, max_new_tokens)
        if max_new_tokens == 0:
            return
        dev = self.device
        B, W = len(prompts), max(len(p) for p in prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=dev)
        seq_ids = torch.tensor(list(sequences) if sequences is not None else [0] * B, device=dev, dtype=torch.long)
        if len(seq_ids) != B:
            raise ValueError(f"{len(seq_ids)} sequence ids for {B} prompts")
        tokens = torch.zeros(B, W, dtype=torch.long, device=dev)
        real = torch.zeros(B, W, dtype=torch.bool, device=dev)
        for b, p in enumerate(prompts):
            start = W - len(p) if padding == "left" else 0
            tokens[b, start:start + len(p)] = torch.tensor(list(p), device=dev)
            real[b, start:start + len(p)] = True
        positions = (real.long().cumsum(1) - 1).clamp(min=0)
        cols = torch.arange(W, device=dev).expand(B, W)
        last_col = (W - 1 if padding == "left" else lengths - 1) * torch.ones(B, dtype=torch.long, device=dev)
        cache = self.new_cache(B, W + max_new_tokens)
        prefill = real & (cols != last_col[:, None])
        prev_state = None
        if bool(prefill.any()):
            out = self.forward(cache, tokens, cols, positions, prefill, seq_ids, adaptive=False, need_logits=False)
            if self.continuous:
                prev_state = out.state.gather(1, (last_col - 1).clamp(min=0)[:, None, None].expand(
                    B, 1, self.config.d_model))
                prev_state = torch.where((lengths > 1)[:, None, None], prev_state, self._noise(seq_ids, lengths - 1))
        col, pos = last_col.clone(), lengths - 1
        step_tokens = tokens.gather(1, last_col[:, None])
        limit = torch.tensor(list(limits) if limits is not None else [max_new_tokens] * B, device=dev)
        if len(limit) != B or bool((limit < 0).any()) or bool((limit > max_new_tokens).any()):
            raise ValueError(f"limits must give each of the {B} rows a count in [0, max_new_tokens]")
        alive = limit > 0
        per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * B
        generators = [torch.Generator(device=dev).manual_seed(s.seed * 1_000_003 + int(q))
                      for s, q in zip(per_row, seq_ids)]
        stop_tensor = torch.tensor(list(stop_ids), device=dev, dtype=torch.long)  # once, not per token
        for i in range(max_new_tokens):
            out = self.forward(cache, step_tokens, col[:, None], pos[:, None], alive[:, None], seq_ids,
                               adaptive=self.adaptive, initial_state=prev_state)
            if isinstance(sampling, Sampling):
                nxt = sample(out.logits[:, -1], sampling, generators, self.config.vocab_size, alive)
            else:
                nxt = torch.stack([sample(out.logits[b:b + 1, -1], per_row[b], generators[b:b + 1],
                                          self.config.vocab_size, alive[b:b + 1])[0] for b in range(B)])
            stopped = torch.isin(nxt, stop_tensor) & alive
            finished = stopped | (alive & (i + 1 >= limit))
            yield StepEvent(i, nxt.tolist(), out.depth[:, -1].tolist(), alive.tolist(),
                            (finished | ~alive).tolist(), out.logits[:, -1])
            alive = alive & ~finished
            if halt:
                alive[list(halt)] = False
            if not bool(alive.any()):
                return
            if self.continuous:
                prev_state = out.state
            step_tokens, col, pos = nxt[:, None], col + 1, pos + 1

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), padding: str = "left",
                 sequences: Optional[Sequence[int]] = None) -> list[Generation]:
        results = [Generation() for _ in prompts]
        for event in self.stream(prompts, max_new_tokens, sampling, stop_ids, padding, sequences):
            for b, r in enumerate(results):
                if event.active[b]:
                    r.tokens.append(event.tokens[b])
                    r.depths.append(event.depths[b])
                    r.stopped = event.tokens[b] in stop_ids
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
        inputs, targets = real[:, :-1], tokens[:, 1:]
        if not self.adaptive and not self.continuous:
            cols = torch.arange(W - 1, device=dev).expand(B, W - 1)
            out = self.forward(cache, tokens[:, :-1], cols, cols, inputs & real[:, 1:], seq_ids, adaptive=False)
            logits, depth = out.logits, out.depth
        else:
            logits, depth, prev = [], [], None
            for c in range(W - 1):
                live = real[:, c + 1]
                col = torch.full((B, 1), c, device=dev, dtype=torch.long)
                out = self.forward(cache, tokens[:, c:c + 1], col, col, live[:, None], seq_ids, adaptive=self.adaptive,
                                   initial_state=prev)
                logits.append(out.logits)
                depth.append(out.depth)
                prev = out.state if self.continuous else None
            logits, depth = torch.cat(logits, 1), torch.cat(depth, 1)
        logp = torch.log_softmax(logits[..., : self.config.vocab_size].float(), -1)
        nll = -logp.gather(-1, targets[..., None]).squeeze(-1)
        n = [len(r) - 1 for r in rows]
        return [nll[b, : n[b]].tolist() for b in range(B)], [depth[b, : n[b]].tolist() for b in range(B)]


def sample(logits: Tensor, sampling: Sampling, generators: Sequence[torch.Generator], vocab_size: int,
           alive: Optional[Tensor] = None) -> Tensor:
    """Next token per row from logits [B, V]: greedy at temperature 0, else temperature / top-k / top-p sampling,
    each row from its own generator (so a row's draws do not depend on the other rows)."""
    logits = logits[:, :vocab_size].float()
    if sampling.temperature == 0:
        return logits.argmax(-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p is not None and sampling.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, -1)
        before = probs.cumsum(-1) - probs          # mass of the strictly more likely tokens
        drop = before >= sampling.top_p            # keep the smallest prefix whose mass reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, -1)
    out = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    for b, g in enumerate(generators):
        if alive is None or bool(alive[b]):
            out[b] = torch.multinomial(probs[b], 1, generator=g)[0]
    return out
