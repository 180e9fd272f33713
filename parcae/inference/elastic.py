"""Elastic depth, measured: teacher-forced loss and mean loops per token through the generation engine.

Every token of a text is decoded as one engine step (its own exit decision, its own KV policy look-ups), with the
true previous tokens as input, so the loss is what generation at that depth setting would pay per token.

    from parcae.inference.elastic import elastic_nll
    row = elastic_nll(Engine(model, exit="kl:1e-3", max_loops=16, kv_policy="latest"), token_ids, window=256)
    row["loss"], row["mean_loops"], row["flops_per_token"]
"""

from __future__ import annotations

import math
from typing import Sequence

from parcae.model.flops import inference_flops_per_token

from .engine import Engine


def elastic_nll(engine: Engine, token_ids: Sequence[int], window: int, batch_size: int = 16,
                max_windows: int | None = None) -> dict:
    """Mean NLL (nats/token) of token_ids[1:], the mean loops each prediction used, the iterations and read-outs
    actually computed per token and the forward FLOPs they cost (exit checks included), scored in windows of
    ``window`` tokens that overlap by one (each window conditioned on its own tokens only, as ``text_nll`` does
    with ``context=1``)."""
    if len(token_ids) < 2:
        raise ValueError("the text is too short to score (fewer than 2 tokens)")
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    # The windows of parcae.eval.perplexity.text_nll with one token of context: rows overlap by one token.
    rows = [list(token_ids[s: s + window]) for s in range(0, len(token_ids) - 1, window - 1)]
    rows = [r for r in rows if len(r) >= 2][: max_windows]
    total, count, loops, iterations_before, readouts_before = 0.0, 0, 0, engine.iterations_run, engine.readouts_run
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        nll, depth = engine.score(chunk)  # every window is sequence 0, as text_nll scores it (design.md §1.4)
        total += sum(map(sum, nll))
        count += sum(map(len, nll))
        loops += sum(map(sum, depth))
    iterations = (engine.iterations_run - iterations_before) / count
    readouts = (engine.readouts_run - readouts_before) / count
    context = sum(c + 1 for r in rows for c in range(len(r) - 1)) / count  # positions each prediction attends to
    return {"loss": total / count, "perplexity": math.exp(total / count), "tokens": count,
            "mean_loops": loops / count, "mean_iterations_computed": iterations, "mean_readouts": readouts,
            "flops_per_token": inference_flops_per_token(engine.config, iterations, readouts, context),
            "exit": str(engine.exit) if engine.exit else None,
            "loops": None if engine.exit else (engine.loops if engine.config.looped else None),
            "max_loops": engine.max_loops if engine.exit else None, "kv_policy": str(engine.policy)}
