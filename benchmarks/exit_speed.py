"""Elastic depth in tokens/s on a trained checkpoint: each exit rule and self-speculative decoding against fixed
depth μ_rec, at batch 1 and batch 8, with the teacher-forced loss each setting pays on held-out text.

    python benchmarks/exit_speed.py --ckpt_path checkpoints/mini_demo/last.ckpt          # ~15 minutes on 2 CPU cores
    python benchmarks/exit_speed.py --ckpt_path ... --settings fixed:8 fixed:1 latent-diff:0.1 cosine:0.003 \
        speculate:3:4 speculate:4:6 --windows 0 [--compile]     # issue 27's elastic figures only, ~4 minutes eager

Every setting is an :class:`parcae.inference.Engine` built as ``parcae generate`` builds it (an exit rule alone gets
the saving defaults: max_loops = μ_rec, KV policy ``latest``, prompt at μ_rec). Generation: 8 prompts of
``--prompt_tokens`` tokens from a held-out play, ``--new_tokens`` greedy tokens each with no stop token, one prompt
at a time (batch 1) and all 8 together (batch 8); settings run interleaved, the figure is the median of
``--repeats``. Loss: :func:`parcae.inference.elastic.elastic_nll` on ``--windows`` windows of the same play (each
token its own engine step, so an exit rule decides per token as in generation), with the forward FLOPs per token
it computed (exit checks included), and at batch 8 the recurrent iterations a decode step ran (as many as its
deepest row needs: exited rows cost nothing, but the step waits for the last). Speculative settings
(``--speculate D:K``) verify at μ_rec, so their output and loss are fixed μ_rec's; their acceptance rate is printed.
``--windows 0`` skips the loss. Writes <out>.json.

``--compile`` builds every engine with ``compile=True`` (the compiled decode step), a rule's setting may name how the
compiled engine runs it (``latent-diff:0.1@segments``, ``@graph`` or ``@eager``: compaction between checks, one graph
whose exited rows keep running, or the eager exit schedule); each (setting, batch) then runs
once untimed before its first timed round (compilation and first-call costs; the seconds are reported as
``warmup_s``), and the batch-8 iterations per step are not counted (a hook would break the compiled graph).

The architecture's ceiling: a token at fixed depth d costs F0 + d·Fr (F0: prelude, coda, head, sampling and
bookkeeping; Fr: one recurrent iteration), so a rule of mean depth d̄ can at best be (F0 + μ·Fr)/(F0 + d̄·Fr) times
fixed μ_rec. F0 and Fr are measured per batch size from the times per token of fixed:1 and fixed:μ_rec (added to
the settings when absent): Fr = (t(μ) − t(1))/(μ − 1), F0 = t(1) − Fr. Printed beside each rule's measured ratio,
with, at batch 8, the ceiling of the iterations a step actually ran (its deepest row) in place of d̄.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from contextlib import contextmanager
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


def engine_for(model, setting: str, **extra) -> Engine:
    """fixed:T | speculate:D:K (at μ_rec) | RULE[:THRESHOLD][@MODE] with the engine's defaults (``extra``:
    compile=True); MODE (segments, graph or eager) is how a compiled engine runs the rule under the ``latest``
    KV policy (``PARCAE_COMPILE_EXIT``, parcae.inference.compiled)."""
    setting, _, mode = setting.partition("@")
    if mode:
        with compile_exit_mode(mode):
            return engine_for(model, setting, **extra)
    kind, _, rest = setting.partition(":")
    if kind == "fixed":
        return Engine(model, loops=int(rest), **extra)
    if kind == "speculate":
        return Engine(model, loops=model.config.mean_recurrence, speculate=rest, **extra)
    return Engine(model, exit=setting, **extra)


@contextmanager
def compile_exit_mode(mode: str):
    """Engines built inside run an exit rule under latest / ring in ``mode`` when compiled (``PARCAE_COMPILE_EXIT``:
    segments, graph or eager); the variable is restored after."""
    previous = os.environ.get("PARCAE_COMPILE_EXIT")
    os.environ["PARCAE_COMPILE_EXIT"] = mode
    try:
        yield
    finally:
        if previous is None:
            del os.environ["PARCAE_COMPILE_EXIT"]
        else:
            os.environ["PARCAE_COMPILE_EXIT"] = previous


def compile_supported() -> bool:
    import inspect

    return "compile" in inspect.signature(Engine.__init__).parameters


def costs(seconds_per_token_1: float, seconds_per_token_mu: float, mu: int) -> tuple[float, float]:
    """(F0, Fr) from the seconds per token at fixed depth 1 and μ: t(d) = F0 + d·Fr."""
    fr = (seconds_per_token_mu - seconds_per_token_1) / (mu - 1)
    return seconds_per_token_1 - fr, fr


def ceiling(f0: float, fr: float, mu: int, depth: float) -> float:
    """The most a rule of mean depth ``depth`` can gain over fixed μ: (F0 + μ·Fr) / (F0 + d̄·Fr)."""
    return (f0 + mu * fr) / (f0 + depth * fr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    p.add_argument("--work", default="tempest", help="corpus id of a held-out play")
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--windows", type=int, default=8, help="windows of 128 tokens for the loss (0: no loss)")
    p.add_argument("--threads", type=int, default=1, help="1 is fastest for token-at-a-time steps on a small CPU")
    p.add_argument("--compile", action="store_true", help="every engine with compile=True (the compiled step)")
    p.add_argument("--out", type=Path, default=None,
                   help="default benchmarks/results/exit_speed (exit_speed_compiled with --compile)")
    args = p.parse_args()
    if args.compile and not compile_supported():
        raise SystemExit("exit_speed: --compile: this checkout's Engine has no compile parameter (compile unavailable)")
    out = args.out or Path("benchmarks/results/exit_speed_compiled" if args.compile else "benchmarks/results/exit_speed")
    extra = {"compile": True} if args.compile else {}
    torch.set_num_threads(args.threads)
    loaded = load_checkpoint(args.ckpt_path, "cpu")
    model, tok = loaded.model, loaded.tokenizer
    mu = model.config.mean_recurrence
    settings = list(dict.fromkeys([f"fixed:{mu}", "fixed:1", *args.settings]))  # F0 and Fr need both
    ids = held_out_ids(tok, args.work, 20_000)
    stride = len(ids) // 8
    prompts = [ids[i * stride: i * stride + args.prompt_tokens] for i in range(8)]
    scored = ids[-args.windows * 127 - 1:]  # the play's end: no overlap with the prompts' continuations

    times: dict[tuple[str, int], list[float]] = {}
    depth: dict[str, float] = {}
    accepted: dict[str, float] = {}
    step_iterations: dict[str, float] = {}  # recurrent iterations a batch-8 decode step ran (its deepest row)
    calls = [0]
    if not args.compile:
        model.recurrent[0].register_forward_pre_hook(lambda module, inputs: calls.__setitem__(0, calls[0] + 1))
    engines: dict[str, Engine] = {}
    warmup: dict[tuple[str, int], float] = {}
    for repeat in range(args.repeats):
        for setting in settings:
            for batch in (1, 8):
                if setting not in engines:
                    start = time.perf_counter()
                    engines[setting] = engine_for(model, setting, **extra)
                    warmup[(setting, 0)] = time.perf_counter() - start  # construction
                engine, tokens, loops = engines[setting], 0, 0
                start = time.perf_counter()
                if args.compile and (setting, batch) not in warmup:  # compilation for this batch's shapes
                    for i in range(0, 8, batch):
                        engine.generate(prompts[i:i + batch], args.new_tokens, sequences=list(range(i, i + batch)))
                engine.generate(prompts[:1], 2)  # warm-up (allocations, first-call costs)
                warmup.setdefault((setting, batch), time.perf_counter() - start)
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
                if batch == 8 and not engine.speculate and not args.compile:  # one prompt chunk, then the steps
                    step_iterations[setting] = (calls[0] - engine.prefill_loops) / args.new_tokens
                if engine.speculate:
                    accepted[f"{setting} batch {batch}"] = acc / max(drafted, 1)
        print(f"[speed] repeat {repeat + 1}/{args.repeats} done", flush=True)

    rows = []
    fixed_costs = {}  # batch -> (F0, Fr), seconds per token
    for batch in (1, 8):
        fixed_costs[batch] = costs(1 / statistics.median(times[("fixed:1", batch)]),
                                   1 / statistics.median(times[(f"fixed:{mu}", batch)]), mu)
    for setting in settings:
        row = {"setting": setting, "mean_loops": depth[setting], "batch8_iterations_per_step": step_iterations.get(setting)}
        if args.windows:
            scorer = Engine(model, loops=mu) if setting.startswith("speculate") else engine_for(model, setting)
            loss = elastic_nll(scorer, scored, 128, batch_size=args.windows)
            row.update(loss=loss["loss"], flops_per_token=loss["flops_per_token"], scored_mean_loops=loss["mean_loops"])
        for batch in (1, 8):
            tps = statistics.median(times[(setting, batch)])
            row[f"tokens_per_s_batch{batch}"] = tps
            row[f"vs_fixed_mu_batch{batch}"] = tps / statistics.median(times[(f"fixed:{mu}", batch)])
            row[f"all_batch{batch}"] = times[(setting, batch)]
            row[f"warmup_s_batch{batch}"] = warmup[(setting, batch)]
            if not setting.startswith("speculate"):  # speculation verifies at μ: the depth ceiling does not apply
                row[f"ceiling_batch{batch}"] = ceiling(*fixed_costs[batch], mu, depth[setting])
            if setting.startswith("speculate"):
                row[f"acceptance_batch{batch}"] = accepted[f"{setting} batch {batch}"]
        if row["batch8_iterations_per_step"] is not None and not setting.startswith("speculate"):
            row["step_ceiling_batch8"] = ceiling(*fixed_costs[8], mu, row["batch8_iterations_per_step"])
        row["construct_s"] = warmup[(setting, 0)]
        rows.append(row)
    base = next(r for r in rows if r["setting"] == f"fixed:{mu}")
    for batch, (f0, fr) in fixed_costs.items():
        print(f"batch {batch}: F0 = {1e3 * f0:.3f} ms/token (prelude, coda, head, sampling, bookkeeping), "
              f"Fr = {1e3 * fr:.3f} ms/token per iteration (from fixed:1 and fixed:{mu})")
    print(f"{'setting':<18} {'loss':>7} {'Δ vs μ':>7} {'loops':>6} {'b8 step':>7} {'MFLOP':>6} {'b1 tok/s':>9} "
          f"{'×':>5} {'ceil':>5} {'b8 tok/s':>9} {'×':>5} {'ceil':>5} {'step':>5}")
    fmt = (lambda r, key, spec: "-" if r.get(key) is None else format(r[key], spec))
    for r in rows:
        note = f"  acceptance {r['acceptance_batch1']:.0%}" if "acceptance_batch1" in r else ""
        delta = r["loss"] - base["loss"] if "loss" in r else None
        print(f"{r['setting']:<18} {fmt(r, 'loss', '7.4f'):>7} {'-' if delta is None else format(delta, '+7.4f'):>7} "
              f"{r['mean_loops']:6.2f} {fmt(r, 'batch8_iterations_per_step', '.2f'):>7} "
              f"{'-' if 'flops_per_token' not in r else format(r['flops_per_token'] / 1e6, '6.2f'):>6} "
              f"{r['tokens_per_s_batch1']:9.1f} {r['vs_fixed_mu_batch1']:5.2f} {fmt(r, 'ceiling_batch1', '5.2f'):>5} "
              f"{r['tokens_per_s_batch8']:9.1f} {r['vs_fixed_mu_batch8']:5.2f} {fmt(r, 'ceiling_batch8', '5.2f'):>5} "
              f"{fmt(r, 'step_ceiling_batch8', '5.2f'):>5}{note}")
    print("ceil: (F0 + μ·Fr)/(F0 + d̄·Fr) with d̄ = loops; step: the same with the iterations a batch-8 step ran")
    payload = {"checkpoint": str(args.ckpt_path), "model": model.config.name, "mean_recurrence": mu,
               "compiled": args.compile,
               "fixed_costs_seconds_per_token": {f"batch{b}": {"F0": f0, "Fr": fr}
                                                 for b, (f0, fr) in fixed_costs.items()},
               "text": args.work, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
               "scored_tokens": len(scored) - 1 if args.windows else 0, "threads": args.threads,
               "repeats": args.repeats,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
               "load_average_at_end": os.getloadavg(), "date": str(date.today()), "torch": torch.__version__,
               "results": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
