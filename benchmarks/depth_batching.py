"""Depth-level (loop-level) batching against token-level steps and fixed depth, with the ceiling it can reach.

    python benchmarks/depth_batching.py                                   # parcae-140m shape (random weights)
    python benchmarks/depth_batching.py --device cuda --new_tokens 64     # the same on a GPU
    python benchmarks/depth_batching.py --scheduler --ckpt_path $CK --rules latent-diff --threads 1 --new_tokens 32
        # the server's scheduler in-process (no HTTP): fixed vs depth-level vs token-level lanes, interleaved
    python benchmarks/depth_batching.py --ckpt_path /tmp/democlone/checkpoints/mini_demo/last.ckpt --rules latent-diff

16 concurrent requests (``--requests``), each the one-token prompt [BOS] with its own sequence id (so its initial
states, tokens and depths are its own, and no prefill muddles the decode time), ``--new_tokens`` greedy tokens each,
fp32 on the CPU (``--threads``). Forced depths: :meth:`parcae.inference.exits.ScriptedDepth.spread` (each token's depth
1..8 from its own initial state, mean ≈ 4.5, identical alone and batched). Settings, every one on the same prompts, interleaved, median of ``--repeats``:

* ``depth-level``      :func:`parcae.inference.depth_batching.generate` with the forced depths (max_loops 8)
* ``token-level``      :meth:`Engine.stream` with the same depths (each step runs to its deepest row)
* ``fixed-8 token``    :meth:`Engine.stream` at fixed depth 8 (the server's fixed-depth lanes)
* ``fixed-8 depth``    depth-level ticks at fixed depth 8 (the overhead of ticks where nobody exits early)
* ``depth-level gather G``  the same, exited tokens read out G at a time (``--gather``; fewer, larger calls)
* ``fixed-4 token``    to measure the per-token costs (below)
* each ``--rules`` rule (a trained checkpoint's real exit rules), depth-level and token-level

Tokens/s counts the generated tokens over the wall time of the run (a first untimed round warms up).
The ceiling: with F0 the fixed work per token (prelude, coda, head, sampling: everything that does not scale with
depth) and Fr one loop iteration per token, both measured from the fixed-depth runs (t_T / N = F0 + T·Fr at T = 8
and 4), a depth-level scheduler at mean depth d̄ gains at most (F0 + 8·Fr) / (F0 + d̄·Fr) over fixed depth 8; the
figure is the depth-level gain over ``fixed-8 token`` as a fraction of it. Appends to benchmarks/results/
depth_batching.json.
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

from parcae.inference import Engine
from parcae.inference.depth_batching import generate as depth_generate
from parcae.inference.exits import ScriptedDepth

ROOT = Path(__file__).resolve().parents[1]


def build_model(args):
    if args.ckpt_path:
        from parcae.runs import load_checkpoint
        return load_checkpoint(args.ckpt_path).model.eval(), Path(args.ckpt_path).parent.name
    from parcae.model import LoopedLM, preset
    torch.manual_seed(0)
    model = LoopedLM(preset(args.preset)).eval()
    with torch.no_grad():  # the scaled-zero init leaves output projections at 0: give every weight some signal
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, f"{args.preset} (random weights)"


def token_level(engine, prompts, n, sequences):
    tokens, depths = [[] for _ in prompts], [[] for _ in prompts]
    for ev in engine.stream(prompts, n, sequences=sequences):
        for b in range(len(prompts)):
            if ev.active[b]:
                tokens[b].append(ev.tokens[b])
                depths[b].append(ev.depths[b])
    return tokens, depths


def depth_level(engine, prompts, n, sequences, gather=1):
    out = depth_generate(engine, prompts, n, sequences=sequences, gather=gather)
    return [g.tokens for g in out], [g.depths for g in out]


def scheduler_run(model, depth, gather: int, prompts, n: int) -> tuple[float, list]:
    """Seconds for the server's scheduler (no HTTP) to answer every prompt (``n`` greedy tokens each, all
    submitted at once, as many rows as prompts), and the answers."""
    from parcae.inference.scheduler import Job, Scheduler

    scheduler = Scheduler(model, max_rows=len(prompts), depth_gather=gather)
    events = [[] for _ in prompts]
    t0 = time.perf_counter()
    for i, prompt in enumerate(prompts):
        scheduler.submit(Job(prompt, n, depth=depth), events[i].append)
    while not all(ev and ev[-1].finish for ev in events):
        scheduler.step()
    return time.perf_counter() - t0, [[(e.token, e.depth) for e in ev] for ev in events]


def scheduler_main(args, model, name) -> dict:
    """--scheduler: the server's scheduler in-process, settings interleaved (the load of a shared machine moves
    between runs): fixed depth, and each rule depth-level (gather 1 and each --gather) and token-level."""
    from parcae.inference.options import DepthOptions

    T, N, V = args.max_loops, args.new_tokens, model.config.vocab_size
    # the scheduler runs every row as sequence 0: prompts of different lengths put their tokens at different
    # positions, so their initial states, and the forced depths, differ
    prompts = [[0, *[(7 * i + j) % (V - 1) + 1 for j in range(i)]] for i in range(args.requests)]
    settings = {f"fixed-{T}": (DepthOptions(loops=T), 0)}
    for rule in ["forced", *args.rules]:
        exit = ScriptedDepth.spread(T) if rule == "forced" else rule
        for g in [1, *args.gather, 0]:
            label = f"{rule} " + ("token-level" if g == 0 else f"depth-level gather {g}")
            settings[label] = (DepthOptions(exit=exit, max_loops=T), g)
    times = {k: [] for k in settings}
    answers = {}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):   # the first round warms up and is not timed
            for key, (depth, g) in settings.items():
                seconds, answers[key] = scheduler_run(model, depth, g, prompts, N)
                if repeat:
                    times[key].append(seconds)
    total = args.requests * N
    tps = {k: round(total / statistics.median(v), 1) for k, v in times.items()}
    fixed = tps[f"fixed-{T}"]
    return {"model": name, "mode": "scheduler", "tokens_per_s": tps,
            "over_fixed": {k: round(v / fixed, 3) for k, v in tps.items()},
            "mean_depth": {k: round(statistics.mean(d for row in a for _, d in row), 3) for k, a in answers.items()},
            "same_answers_depth_and_token_level": {
                rule: len({str(a) for k, a in answers.items() if k.startswith(rule + " ")}) == 1
                for rule in ["forced", *args.rules]}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="parcae-140m")
    p.add_argument("--ckpt_path", default=None, help="a trained checkpoint instead of the preset's random weights")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--new_tokens", type=int, default=16)
    p.add_argument("--max_loops", type=int, default=8)
    p.add_argument("--rules", nargs="*", default=[], help="real exit rules to run too (trained checkpoints)")
    p.add_argument("--gather", type=int, nargs="*", default=[4],
                   help="also depth-level with exited tokens read out this many at a time")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ... (the GPU check runs it there)")
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "depth_batching.json"))
    p.add_argument("--scheduler", action="store_true",
                   help="measure the server's scheduler in-process instead (fixed, depth-level, token-level lanes)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, name = build_model(args)
    model = model.to(args.device)
    if args.scheduler:
        result = {**scheduler_main(args, model, name),
                  "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                             f"load {os.getloadavg()[0]:.1f}", "threads": args.threads, "device": args.device,
                  "requests": args.requests, "new_tokens": args.new_tokens, "max_loops": args.max_loops}
        print(json.dumps(result, indent=1))
        _append(Path(args.output), result)
        return
    V, T, N = model.config.vocab_size, args.max_loops, args.new_tokens
    prompts = [[0]] * args.requests   # no prefill to time: each request's own sequence id makes it differ
    sequences = list(range(args.requests))
    forced = ScriptedDepth.spread(T)
    settings = {
        "depth-level": (lambda: Engine(model, exit=forced, max_loops=T), depth_level),
        **{f"depth-level gather {g}": (lambda: Engine(model, exit=forced, max_loops=T),
                                       lambda e, p, n, q, g=g: depth_level(e, p, n, q, g)) for g in args.gather},
        "token-level": (lambda: Engine(model, exit=forced, max_loops=T), token_level),
        f"fixed-{T} token": (lambda: Engine(model, loops=T), token_level),
        f"fixed-{T} depth": (lambda: Engine(model, loops=T), depth_level),
        f"fixed-{T // 2} token": (lambda: Engine(model, loops=T // 2), token_level),
    }
    for rule in args.rules:
        settings[f"{rule} depth-level"] = (lambda rule=rule: Engine(model, exit=rule, max_loops=T), depth_level)
        settings[f"{rule} token-level"] = (lambda rule=rule: Engine(model, exit=rule, max_loops=T), token_level)
    times = {k: [] for k in settings}
    depths, outputs = {}, {}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):   # the first round warms up and is not timed
            for key, (make, run) in settings.items():
                engine = make()
                t0 = time.perf_counter()
                tokens, d = run(engine, prompts, N, sequences)
                if repeat:
                    times[key].append(time.perf_counter() - t0)
                depths[key], outputs[key] = d, tokens
    total = args.requests * N
    tps = {k: total / statistics.median(v) for k, v in times.items()}
    # the same tokens and depths both ways (tests/inference/test_depth_batching.py checks it exactly; here a
    # greedy near-tie could flip between batch shapes, so it is reported, not asserted)
    same = {"forced": outputs["depth-level"] == outputs["token-level"] and depths["depth-level"] == depths["token-level"],
            **{rule: outputs[f"{rule} depth-level"] == outputs[f"{rule} token-level"] for rule in args.rules}}
    t_hi, t_lo = total / tps[f"fixed-{T} token"], total / tps[f"fixed-{T // 2} token"]
    Fr = (t_hi - t_lo) / (total * (T - T // 2))
    F0 = t_hi / total - T * Fr
    dbar = statistics.mean(x for row in depths["depth-level"] for x in row)
    ceiling = (F0 + T * Fr) / (F0 + dbar * Fr)
    gain = tps["depth-level"] / tps[f"fixed-{T} token"]
    result = {
        "model": name, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"load {os.getloadavg()[0]:.1f}", "torch": torch.__version__, "threads": args.threads,
        "device": args.device, "requests": args.requests, "new_tokens": N, "max_loops": T, "mean_forced_depth": round(dbar, 3),
        "tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "F0_ms": round(F0 * 1e3, 3), "Fr_ms": round(Fr * 1e3, 3), "ceiling_gain": round(ceiling, 3),
        "depth_level_gain_over_fixed": round(gain, 3), "fraction_of_ceiling": round(gain / ceiling, 3),
        "depth_level_over_token_level": round(tps["depth-level"] / tps["token-level"], 3),
        "same_tokens_depth_and_token_level": same,
        f"fixed_{T}_depth_level_overhead": round(tps[f"fixed-{T} token"] / tps[f"fixed-{T} depth"] - 1, 3),
        **{f"{rule}_mean_depth": round(statistics.mean(x for row in depths[f"{rule} depth-level"] for x in row), 3)
           for rule in args.rules},
    }
    print(json.dumps(result, indent=1))
    _append(Path(args.output), result)


def _append(out: Path, result: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(out.read_text()) if out.exists() else []
    out.write_text(json.dumps([*previous, result], indent=1) + "\n")
    print(f"[depth_batching] appended to {out}")


if __name__ == "__main__":
    main()
