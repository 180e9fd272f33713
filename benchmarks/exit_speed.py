"""Elastic depth in tokens/s on a trained checkpoint: each exit rule and self-speculative decoding against fixed
depth μ_rec, at batch 1 and batch 8, with the teacher-forced loss each setting pays on held-out text.

    python benchmarks/exit_speed.py --ckpt_path checkpoints/mini_demo/last.ckpt          # ~15 minutes on 2 CPU cores

Every setting is an :class:`parcae.inference.Engine` built as ``parcae generate`` builds it (an exit rule alone gets
the saving defaults: max_loops = μ_rec, KV policy ``latest``, prompt at μ_rec). Generation: 8 prompts of
``--prompt_tokens`` tokens from a held-out play, ``--new_tokens`` greedy tokens each with no stop token, one prompt
at a time (batch 1) and all 8 together (batch 8); settings run interleaved, the figure is the median of
``--repeats``. Loss: :func:`parcae.inference.elastic.elastic_nll` on ``--windows`` windows of the same play (each
token its own engine step, so an exit rule decides per token as in generation), with the forward FLOPs per token
it computed (exit checks included), and at batch 8 the recurrent iterations a decode step ran (as many as its
deepest row needs: exited rows cost nothing, but the step waits for the last). Speculative settings (``--speculate D:K``) verify at μ_rec, so their output
and loss are fixed μ_rec's; their acceptance rate is printed. Writes <out>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from elastic_depth import held_out_ids
from parcae.inference import Engine
from parcae.inference.elastic import elastic_nll
from parcae.runs import load_checkpoint

DEFAULT_SETTINGS = ["fixed:8", "fixed:6", "fixed:4", "latent-diff", "latent-diff:0.1", "cosine", "cosine:0.003",
                    "kl", "minp-kl", "entropy-diff", "argmax-stability", "speculate:2:4", "speculate:3:4",
                    "speculate:4:6"]


def engine_for(model, setting: str) -> Engine:
    """fixed:T | speculate:D:K (at μ_rec) | RULE[:THRESHOLD] with the engine's defaults."""
    kind, _, rest = setting.partition(":")
    if kind == "fixed":
        return Engine(model, loops=int(rest))
    if kind == "speculate":
        return Engine(model, loops=model.config.mean_recurrence, speculate=rest)
    return Engine(model, exit=setting)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    p.add_argument("--work", default="tempest", help="corpus id of a held-out play")
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--windows", type=int, default=8, help="windows of 128 tokens for the loss")
    p.add_argument("--threads", type=int, default=1, help="1 is fastest for token-at-a-time steps on a small CPU")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/exit_speed"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.ckpt_path, "cpu")
    model, tok = loaded.model, loaded.tokenizer
    mu = model.config.mean_recurrence
    ids = held_out_ids(tok, args.work, 20_000)
    stride = len(ids) // 8
    prompts = [ids[i * stride: i * stride + args.prompt_tokens] for i in range(8)]
    scored = ids[-args.windows * 127 - 1:]  # the play's end: no overlap with the prompts' continuations

    times: dict[tuple[str, int], list[float]] = {}
    depth: dict[str, float] = {}
    accepted: dict[str, float] = {}
    step_iterations: dict[str, float] = {}  # recurrent iterations a batch-8 decode step ran (its deepest row)
    calls = [0]
    model.recurrent[0].register_forward_pre_hook(lambda module, inputs: calls.__setitem__(0, calls[0] + 1))
    for repeat in range(args.repeats):
        for setting in args.settings:
            for batch in (1, 8):
                engine, tokens, loops = engine_for(model, setting), 0, 0
                engine.generate(prompts[:1], 2)  # warm-up (allocations, first-call costs)
                drafted = acc = 0
                calls[0] = 0
                start = time.perf_counter()
                for i in range(0, 8, batch):
                    for g in engine.generate(prompts[i:i + batch], args.new_tokens, sequences=list(range(i, i + batch))):
                        tokens, loops = tokens + len(g.tokens), loops + sum(g.depths)
                        if g.speculation is not None:
                            drafted, acc = drafted + g.speculation.drafted, acc + g.speculation.accepted
                times.setdefault((setting, batch), []).append(tokens / (time.perf_counter() - start))
                depth[setting] = loops / tokens
                if batch == 8 and not engine.speculate:  # one prompt chunk (prefill_loops calls), then the steps
                    step_iterations[setting] = (calls[0] - engine.prefill_loops) / args.new_tokens
                if engine.speculate:
                    accepted[f"{setting} batch {batch}"] = acc / max(drafted, 1)
        print(f"[speed] repeat {repeat + 1}/{args.repeats} done", flush=True)

    rows = []
    for setting in args.settings:
        scorer = Engine(model, loops=mu) if setting.startswith("speculate") else engine_for(model, setting)
        loss = elastic_nll(scorer, scored, 128, batch_size=args.windows)
        row = {"setting": setting, "loss": loss["loss"], "mean_loops": depth[setting],
               "batch8_iterations_per_step": step_iterations.get(setting),
               "flops_per_token": loss["flops_per_token"], "scored_mean_loops": loss["mean_loops"]}
        for batch in (1, 8):
            tps = statistics.median(times[(setting, batch)])
            row[f"tokens_per_s_batch{batch}"] = tps
            row[f"vs_fixed_mu_batch{batch}"] = tps / statistics.median(times[(f"fixed:{mu}", batch)])
            row[f"all_batch{batch}"] = times[(setting, batch)]
            if setting.startswith("speculate"):
                row[f"acceptance_batch{batch}"] = accepted[f"{setting} batch {batch}"]
        rows.append(row)
    base = next(r for r in rows if r["setting"] == f"fixed:{mu}")
    print(f"{'setting':<18} {'loss':>7} {'Δ vs μ':>7} {'loops':>6} {'b8 step':>7} {'MFLOP':>6} {'b1 tok/s':>9} "
          f"{'×':>5} {'b8 tok/s':>9} {'×':>5}")
    for r in rows:
        extra = f"  acceptance {r['acceptance_batch1']:.0%}" if "acceptance_batch1" in r else ""
        step = "-" if r["batch8_iterations_per_step"] is None else f"{r['batch8_iterations_per_step']:.2f}"
        print(f"{r['setting']:<18} {r['loss']:7.4f} {r['loss'] - base['loss']:+7.4f} {r['mean_loops']:6.2f} "
              f"{step:>7} {r['flops_per_token'] / 1e6:6.2f} {r['tokens_per_s_batch1']:9.1f} {r['vs_fixed_mu_batch1']:5.2f} "
              f"{r['tokens_per_s_batch8']:9.1f} {r['vs_fixed_mu_batch8']:5.2f}{extra}")
    payload = {"checkpoint": str(args.ckpt_path), "model": model.config.name, "mean_recurrence": mu,
               "text": args.work, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "scored_tokens": len(scored) - 1, "threads": args.threads, "repeats": args.repeats,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
               "load_average_at_end": os.getloadavg(), "date": str(date.today()), "torch": torch.__version__,
               "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
