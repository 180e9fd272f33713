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
    engine.speculation                                       # {"rounds": ..., "drafted": ..., "accepted": ...}
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .engine import Engine, Sampling, StepEvent, generator_seed, sampling_probs


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


def _distribution(logits: Tensor, sampling: Sampling, vocab_size: int) -> Tensor:
    """[V] the distribution a token is drawn from; one-hot on the argmax for greedy decoding."""
    if sampling.temperature == 0:
        return F.one_hot(logits[:vocab_size].argmax(), vocab_size).float()
    return sampling_probs(logits[None], sampling, vocab_size)[0]


@torch.no_grad()
def speculative_stream(engine: Engine, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                       sampling: Sampling | Sequence[Sampling], stop_ids: Sequence[int], padding: str,
                       sequences: Optional[Sequence[int]], limits: Optional[Sequence[int]],
                       halt: Optional[set]) -> Iterator[StepEvent]:
    """:meth:`Engine.stream` with self-speculative rounds; one event per emitted token index."""
    draft_loops, k = engine.speculate
    V, dev = engine.config.vocab_size, engine.device
    start = engine.start(prompts, max_new_tokens, padding, sequences, limits, extra_columns=k)
    B, cache, seq_ids, limit = start.B, start.cache, start.seq_ids, start.limits
    per_row = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling] * B
    generators = [torch.Generator(device=dev).manual_seed(generator_seed(s.seed, q))
                  for s, q in zip(per_row, start.sequences)]
    stops = {int(t) for t in stop_ids}
    x, col, pos = start.tokens[:, 0], list(start.cols), list(start.positions)
    made, alive, index = [0] * B, [n > 0 for n in limit], 0
    engine.speculation = stats = {"rounds": 0, "drafted": 0, "accepted": 0}
    while any(alive):
        rows = [b for b in range(B) if alive[b]]
        n = min(k, max(limit[b] - made[b] for b in rows))   # never draft past what every row may still emit
        live = torch.tensor(alive, device=dev)
        # Draft: n steps at draft_loops, each feeding its token to the next.
        inputs, states, drafts, p = [x], [], [], []
        for j in range(n):
            out = engine.forward(cache, inputs[-1][:, None], torch.tensor(col, device=dev)[:, None] + j,
                                 torch.tensor(pos, device=dev)[:, None] + j, live[:, None], seq_ids, adaptive=False,
                                 rows=rows, max_col=max(col[b] for b in rows) + j, loops=draft_loops)
            dist = torch.stack([_distribution(out.logits[b, -1], per_row[b], V) for b in range(B)])
            token = torch.stack([torch.multinomial(dist[b], 1, generator=generators[b])[0] if alive[b]
                                 else torch.zeros((), dtype=torch.long, device=dev) for b in range(B)])
            states.append(out.state)
            drafts.append(token)
            p.append(dist)
            inputs.append(token)
        # Verify: the n inputs continue from their state after draft_loops iterations to the full depth, in one chunk.
        chunk = torch.stack(inputs[:n], 1)
        cols = torch.tensor(col, device=dev)[:, None] + torch.arange(n, device=dev)
        positions = torch.tensor(pos, device=dev)[:, None] + torch.arange(n, device=dev)
        out = engine.forward(cache, chunk, cols, positions, live[:, None].expand(B, n), seq_ids, adaptive=False,
                             initial_state=torch.cat(states, 1), rows=rows, max_col=max(col[b] for b in rows) + n - 1,
                             first_loop=draft_loops)
        drafted, p = torch.stack(drafts, 1), torch.stack(p, 1)                       # [B, n], [B, n, V]
        accepted, correction = [], []
        zero = torch.zeros((), dtype=torch.long, device=dev)
        for b in range(B):
            if not alive[b]:
                accepted.append(zero)
                correction.append(zero)
                continue
            q = torch.stack([_distribution(out.logits[b, j], per_row[b], V) for j in range(n)])   # [n, V]
            d = drafted[b]
            ratio = q.gather(1, d[:, None])[:, 0] / p[b].gather(1, d[:, None])[:, 0].clamp(min=1e-30)
            keep = torch.rand(n, generator=generators[b], device=dev) < ratio
            m = keep.long().cumprod(0).sum()                                           # leading accepted drafts
            at = m.clamp(max=n - 1)
            residual = (q[at] - p[b, at]).clamp(min=0)
            residual = torch.where(residual.sum() > 0, residual, q[at])
            accepted.append(m)
            correction.append(torch.multinomial(residual / residual.sum(), 1, generator=generators[b])[0])
        values = torch.cat([torch.stack(accepted), torch.stack(correction), drafted.flatten()]).tolist()  # one read
        m_list, c_list, d_list = values[:B], values[B:2 * B], values[2 * B:]
        stats["rounds"] += 1
        emitted: list[list[int]] = [[] for _ in range(B)]
        finished = [False] * B
        for b in rows:
            m = m_list[b]
            stats["drafted"] += n
            stats["accepted"] += m
            proposal = d_list[b * n: b * n + m] + ([c_list[b]] if m < n else [])
            for t in proposal:
                emitted[b].append(t)
                made[b] += 1
                if t in stops or made[b] >= limit[b]:
                    finished[b] = True
                    break
            step = min(m + 1, n)                 # the next input's column: the correction's, or the last draft's
            cache.forget(b, col[b] + step)       # the rejected drafts' columns
            col[b], pos[b] = col[b] + step, pos[b] + step
        x = torch.tensor([e[-1] if e else 0 for e in emitted], device=dev)
        for j in range(max(map(len, emitted))):
            active = [j < len(e) for e in emitted]
            done = [(a and finished[b] and j == len(emitted[b]) - 1) or not alive[b] for b, a in enumerate(active)]
            yield StepEvent(index, [e[j] if j < len(e) else 0 for e in emitted], [engine.loops] * B, active, done)
            index += 1
        alive = [a and not f for a, f in zip(alive, finished)]
        for b in halt or ():
            alive[b] = False
