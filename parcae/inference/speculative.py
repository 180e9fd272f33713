"""Self-speculative decoding: draft k tokens with few loops, verify them at the full depth in one chunk.

A token's first D iterations do not depend on how many iterations follow, so the draft — the same model at D loops —
computes exactly the first D iterations the target (T loops) needs. The verify pass continues the drafted tokens from
their state after D iterations, all in one chunk, for the remaining T − D iterations, reusing every key/value the
draft stored; only the coda differs (the draft reads out h_D, the target h_T), and the verify pass overwrites the
drafted tokens' coda entries. The columns of rejected tokens are dropped from the cache.

Acceptance is the standard rule (Leviathan et al., 2023, "Fast Inference from Transformers via Speculative
Decoding"): a drafted token x is kept with probability min(1, q(x) / p(x)) (p: the draft's distribution, q: the
target's, both after temperature / top-k / top-p); at the first rejection a token is drawn from
norm(max(0, q − p)) instead and the round ends. Every emitted token is then distributed as the target would draw
it. Greedy decoding is the same rule with one-hot p and q: keep the drafts the target's argmax agrees with, then the
target's own token, so the output equals plain greedy decoding at T loops token for token. A round emits 1..k tokens
and reads the device once.

    engine = Engine(model, loops=8, speculate=(2, 4))       # or speculate="2:4": draft at 2 loops, 4 per round
    out = engine.generate([[bos, *ids]], 64)
    out[0].speculation                                       # SpeculationStats(rounds=..., drafted=..., accepted=...)
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch

from .engine import (Engine, Sampling, SpeculationStats, StepEvent, decode_step, row_generators, sample_from_probs,
                     sampling_probs)


def parse_speculate(spec: str | tuple[int, int], engine: Engine) -> tuple[int, int]:
    """(draft loops, tokens per round) from "D:K" or a pair, checked against the engine's depth settings."""
    if isinstance(spec, str):
        draft, _, k = spec.partition(":")
        try:
            spec = (int(draft), int(k))
        except ValueError:
            raise ValueError(f"speculate {spec!r}: give DRAFT_LOOPS:K, e.g. 2:4") from None
    draft, k = spec
    if not engine.config.looped:
        raise ValueError(f"speculative decoding drafts with fewer loops; {engine.config.name} is a fixed-depth model")
    if engine.adaptive or engine.continuous:
        raise ValueError("speculative decoding verifies at one fixed depth: give loops, not an exit rule or "
                         "continuous warm start")
    if not 1 <= draft < engine.loops:
        raise ValueError(f"speculate: the draft depth must be in [1, {engine.loops - 1}] (below the target depth "
                         f"{engine.loops}), got {draft}")
    if k < 1:
        raise ValueError(f"speculate: draft at least 1 token per round, got {k}")
    return draft, k


@torch.no_grad()
def speculative_stream(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       sampling: Sampling | Sequence[Sampling], stop_ids: Sequence[int], padding: str,
                       sequences: Optional[Sequence[int]], limits: Optional[Sequence[int]],
                       halt: Optional[set]) -> Iterator[StepEvent]:
    """:meth:`Engine.stream` with self-speculative rounds; one event per emitted token index, each carrying every
    row's :class:`SpeculationStats` so far.

    A row's round depends on the row alone: it drafts n_b = min(k, tokens it may still emit) tokens (a row with
    fewer left sits out the batch's later draft steps and verify columns), and its generator gives, in order, its
    n_b draft draws, n_b acceptance uniforms and one residual draw, so its random stream — and its tokens — are
    the same alone or in any batch."""
    draft_loops, k = engine.speculate
    V, dev = engine.config.vocab_size, engine.device
    start = engine.start(prompts, max_new_tokens, padding, sequences, limits, extra_columns=k)
    B, cache, seq_ids, limit = start.B, start.cache, start.seq_ids, start.limits
    per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * B
    generators = row_generators(per_row, start.sequences, dev)
    stops = {int(t) for t in stop_ids}
    x, col, pos = start.tokens[:, 0], list(start.cols), list(start.positions)
    made, alive, index = [0] * B, [n > 0 for n in limit], 0
    stats = [SpeculationStats() for _ in range(B)]
    while any(alive):
        rows = [b for b in range(B) if alive[b]]
        width = {b: min(k, limit[b] - made[b]) for b in rows}   # never draft past what the row may still emit
        n = max(width.values())
        cols0, pos0 = torch.tensor(col, device=dev), torch.tensor(pos, device=dev)
        # Draft: n steps at draft_loops, each feeding its token to the next; row b takes part in its first n_b.
        inputs, states, p = [x], [], []
        for j in range(n):
            drafting = [b for b in rows if j < width[b]]
            step = decode_step(engine, cache, inputs[-1], cols0 + j, pos0 + j, seq_ids, drafting,
                               max(col[b] for b in drafting) + j, per_row, generators, loops=draft_loops,
                               want_probs=True)
            step.raise_errors()
            states.append(step.state)
            p.append(step.probs)
            inputs.append(step.tokens)
        # Verify: the inputs continue from their state after draft_loops iterations to the full depth, in one chunk.
        chunk = torch.stack(inputs[:n], 1)
        offsets = torch.arange(n, device=dev)
        real = torch.tensor([[alive[b] and j < width.get(b, 0) for j in range(n)] for b in range(B)], device=dev)
        out = engine.forward(cache, chunk, cols0[:, None] + offsets, pos0[:, None] + offsets, real, seq_ids,
                             adaptive=False, initial_state=torch.cat(states, 1), rows=rows,
                             max_col=max(col[b] for b in rows) + n - 1, first_loop=draft_loops)
        drafted, p = torch.stack(inputs[1:], 1), torch.stack(p, 1)                     # [B, n], [B, n, V]
        zero = torch.zeros((), dtype=torch.long, device=dev)
        accepted, correction = [zero] * B, [zero] * B
        for b in rows:
            w = width[b]
            q = sampling_probs(out.logits[b, :w], per_row[b], V)                          # [w, V]
            d = drafted[b, :w]
            ratio = q.gather(1, d[:, None])[:, 0] / p[b, :w].gather(1, d[:, None])[:, 0].clamp(min=1e-30)
            keep = torch.rand(w, generator=generators[b], device=dev) < ratio
            m = keep.long().cumprod(0).sum()                                           # leading accepted drafts
            at = m.clamp(max=w - 1)
            residual = (q[at] - p[b, at]).clamp(min=0)
            residual = torch.where(residual.sum() > 0, residual, q[at])
            accepted[b] = m
            correction[b] = sample_from_probs((residual / residual.sum())[None], [generators[b]])[0]
        values = torch.cat([torch.stack(accepted), torch.stack(correction), drafted.flatten()]).tolist()  # one read
        m_list, c_list, d_list = values[:B], values[B:2 * B], values[2 * B:]
        emitted: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        for b in rows:
            m, w = m_list[b], width[b]
            stats[b] = stats[b] + SpeculationStats(1, w, m)
            proposal = d_list[b * n: b * n + m] + ([c_list[b]] if m < w else [])
            for t in proposal:
                emitted[b].append(t)
                made[b] += 1
                if t in stops or made[b] >= limit[b]:
                    finished[b] = True
                    break
            step_cols = min(m + 1, w)            # the next input's column: the correction's, or the last draft's
            cache.forget(b, col[b] + step_cols)  # the rejected drafts' columns
            col[b], pos[b] = col[b] + step_cols, pos[b] + step_cols
        x = torch.tensor([e[-1] if e else 0 for e in emitted], device=dev)
        for j in range(max(map(len, emitted))):
            active = [j < len(e) for e in emitted]
            done = [(a and finished[b] and j == len(emitted[b]) - 1) or not alive[b] for b, a in enumerate(active)]
            yield StepEvent(index, [e[j] if j < len(e) else 0 for e in emitted], [engine.loops] * B, active, done,
                            speculation=list(stats))
            index += 1
        alive = [a and not f for a, f in zip(alive, finished)]
        for b in halt or ():
            alive[b] = False

