"""The compiled engine's exit-rule modes against compiled fixed depth, with forced mixed depths and the ceiling.

    python benchmarks/compiled_exit.py                                  # parcae-140m shape (random weights), ~15 min
    python benchmarks/compiled_exit.py --ckpt_path checkpoints/mini_demo/last.ckpt --new_tokens 64   # demo, ~5 min
    python benchmarks/compiled_exit.py --device cuda --new_tokens 64    # the same on a GPU

Under the ``latest`` KV policy a compiled engine (``Engine(..., compile=True)``) runs an exit rule one of three ways
(``PARCAE_COMPILE_EXIT``, parcae.inference.compiled): ``segments`` (a graph per stretch of iterations between
checks, on the rows still deciding padded to a row bucket: the compute of exited tokens is saved), ``graph`` (one
graph per token in which exited rows keep running) or ``eager`` (the eager exit schedule on the static cache). This
script times each, and the eager engine's exit schedule, against the compiled engine at fixed depth T = ``--loops``
(default μ_rec), greedy, ``--new_tokens`` tokens for 8 one-token prompts [BOS] with their own sequence ids, one at a
time (batch 1) and all together (batch 8), settings interleaved, median of ``--repeats`` (a first untimed round
compiles and warms up; its seconds are reported as ``warmup_s``).

Depths are forced (:meth:`parcae.inference.exits.ScriptedDepth.spread`: each token's depth 1..T from its own initial
state, mean ≈ (T + 1) / 2, the same in any batch), so every mode runs the same tokens at the same depths; the script
checks that (``same_tokens``). The ceiling: a token at fixed depth d costs F0 + d·Fr (F0 and Fr from compiled
fixed:1 and fixed:T), so a mode at mean depth d̄ can at best be (F0 + T·Fr)/(F0 + d̄·Fr) times fixed T (for a
batch, the ideal compaction that drops every exited token at once). Appends to benchmarks/results/compiled_exit.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from depth_batching import build_model
from exit_speed import ceiling, compile_exit_mode, costs
from parcae.inference import Engine
from parcae.inference.exits import ScriptedDepth

ROOT = Path(__file__).resolve().parents[1]
MODES = ("segments", "graph", "eager")


def engine(model, setting: str, loops: int) -> Engine:
    """fixed:T (compiled), exit:MODE (compiled, forced depths), eager-exit (the eager engine, forced depths)."""
    kind, _, rest = setting.partition(":")
    if kind == "fixed":
        return Engine(model, loops=int(rest), compile=True)
    depth = dict(exit=ScriptedDepth.spread(loops), max_loops=loops, kv_policy="latest")
    if kind == "eager-exit":
        return Engine(model, **depth)
    with compile_exit_mode(rest):
        return Engine(model, compile=True, **depth)


def run(e: Engine, batch: int, n: int) -> tuple[float, list, list]:
    """Seconds for 8 prompts ``batch`` at a time, and their tokens and depths."""
    prompts, tokens, depths = [[0]] * 8, [], []
    start = time.perf_counter()
    for i in range(0, 8, batch):
        for g in e.generate(prompts[i:i + batch], n, sequences=list(range(i, i + batch))):
            tokens.append(g.tokens)
            depths.append(g.depths)
    if e.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens, depths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="parcae-140m")
    p.add_argument("--ckpt_path", default=None, help="a trained checkpoint instead of the preset's random weights")
    p.add_argument("--loops", type=int, default=None, help="fixed depth T and the rules' max_loops (default μ_rec)")
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "compiled_exit.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, name = build_model(args)
    model = model.to(args.device)
    T = args.loops or model.config.mean_recurrence
    settings = [f"fixed:{T}", "fixed:1", *(f"exit:{m}" for m in MODES), "eager-exit"]
    engines = {s: engine(model, s, T) for s in settings}
    times = {(s, b): [] for s in settings for b in (1, 8)}
    warmup, answers = {}, {}
    for repeat in range(args.repeats + 1):  # round 0 compiles and warms up
        for s in settings:
            for b in (1, 8):
                seconds, tokens, depths = run(engines[s], b, args.new_tokens)
                if repeat:
                    times[(s, b)].append(seconds)
                else:
                    warmup[f"{s} batch {b}"] = round(seconds, 2)
                    answers[(s, b)] = (tokens, depths)
        print(f"[compiled_exit] round {repeat}/{args.repeats} done", flush=True)
    total = 8 * args.new_tokens
    tps = {k: total / statistics.median(v) for k, v in times.items()}
    rows = []
    for b in (1, 8):
        f0, fr = costs(1 / tps[("fixed:1", b)], 1 / tps[(f"fixed:{T}", b)], T)
        for s in settings[2:]:
            depths = answers[(s, b)][1]
            mean = statistics.mean(d for row in depths for d in row)
            rows.append({"setting": s, "batch": b, "tokens_per_s": round(tps[(s, b)], 1),
                         "vs_compiled_fixed": round(tps[(s, b)] / tps[(f"fixed:{T}", b)], 3),
                         "mean_depth": round(mean, 2), "ceiling": round(ceiling(f0, fr, T, mean), 3),
                         "same_tokens": answers[(s, b)] == answers[("exit:graph", b)]})
        rows.append({"setting": f"fixed:{T}", "batch": b, "tokens_per_s": round(tps[(f"fixed:{T}", b)], 1),
                     "F0_ms": round(1e3 * f0, 4), "Fr_ms": round(1e3 * fr, 4)})
    print(f"{name}, T = {T}, {args.new_tokens} tokens x 8 prompts, {args.threads} thread(s), {args.device}")
    print(f"{'setting':<16} {'batch':>5} {'tok/s':>9} {'x fixed':>8} {'ceiling':>8} {'depth':>6} same")
    for r in rows:
        if "F0_ms" in r:
            print(f"{r['setting']:<16} {r['batch']:>5} {r['tokens_per_s']:>9} {'1.000':>8}   "
                  f"(F0 {r['F0_ms']} ms, Fr {r['Fr_ms']} ms per token)")
        else:
            print(f"{r['setting']:<16} {r['batch']:>5} {r['tokens_per_s']:>9} {r['vs_compiled_fixed']:>8} "
                  f"{r['ceiling']:>8} {r['mean_depth']:>6} {r['same_tokens']}")
    record = {"date": datetime.now(timezone.utc).isoformat(timespec="minutes"), "model": name, "loops": T,
              "new_tokens": args.new_tokens, "threads": args.threads, "device": args.device,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
              "torch": torch.__version__, "repeats": args.repeats, "load_average_at_end": os.getloadavg(),
              "warmup_s": warmup, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    history = json.loads(args.out.read_text()) if args.out.exists() else []
    args.out.write_text(json.dumps(history + [record], indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
