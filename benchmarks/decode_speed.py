"""Decode speed at fixed depth μ_rec: today's engine (the code of commit ec2adf8) against the new eager engine and
the new compiled engine (``Engine(model, loops=μ_rec, compile=True)``), greedy, batch 1 and 8, in one process,
interleaved, warm-up and compilation excluded from tokens/s and reported separately.

    python benchmarks/decode_speed.py --ckpt_path checkpoints/mini_demo/last.ckpt   # demo + parcae-140m, ~10-15 min
    python benchmarks/decode_speed.py --models demo --ckpt_path ... --rounds 1 --new_tokens 8   # smoke run, ~1 min
    python benchmarks/decode_speed.py --models parcae-140m --device cuda              # GPU (benchmarks/gpu_check.sh)

Engines ("today", "eager", "compiled"): "today" is the package as it was at ``--baseline_ref`` (default ec2adf8,
issue 27's starting point), extracted with ``git archive`` into a temporary folder as the package
``parcae_today`` (its ``import parcae...`` statements renamed; nothing else changes) and imported beside this
checkout's ``parcae`` in the same process; its model is today's ``LoopedLM`` holding the same weights. "eager" and
"compiled" are this checkout's engine. A checkout without that commit (a shallow clone) reports "today" as
unavailable; a checkout whose ``Engine`` has no ``compile`` parameter reports "compiled" as unavailable.

Models (``--models``): ``demo`` = the trained checkpoint ``--ckpt_path`` (prompts: ``--prompt_tokens`` tokens of a
held-out play); a preset name (default ``parcae-140m``) = that shape with random weights (seed 0, the zero-initialised
output projections filled as benchmarks/generate.py does), random prompts, ``--preset_new_tokens`` new tokens.

One measurement: ``Engine.stream`` of ``batch`` equal-length prompts to ``new_tokens`` tokens, no stop token.
tokens/s = batch x new tokens / wall time of the whole call (prefill included); decode tokens/s = batch x (new
tokens - 1) / time from the first to the last step (steps only). Each (model, threads) runs every engine at every
batch once per round, the engines' order rotated each round; a figure is the median over ``--rounds``. Before its
first round each (engine, batch) runs once untimed as the measured run would (warm-up: first-call costs and, for
the compiled engine, compilation); that time and the engine's construction time are reported separately, and the
warm-up's greedy tokens are compared with today's (``same_tokens``). Writes ``--out`` (JSON) and prints a table
with the targets of issue 27 on the demo model: compiled >= 4x today at batch 1 and >= 2.5x at batch 8, eager >=
1.5x today.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import io
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BASELINE_PACKAGE = "parcae_today"
ENGINES = ("today", "eager", "compiled")
TARGETS = {("compiled", 1): 4.0, ("compiled", 8): 2.5, ("eager", 1): 1.5, ("eager", 8): 1.5}  # x today, demo model


# -- today's package, beside this checkout's ---------------------------------------------------------------------
def baseline_package(ref: str, into: Path):
    """This repository's ``parcae`` package at commit ``ref`` as the importable package ``parcae_today`` (only its
    own import statements renamed), or a string saying why not."""
    done = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "parcae"], capture_output=True)
    if done.returncode:
        return f"git archive {ref} failed: {done.stderr.decode(errors='replace').strip()[:200]}"
    tarfile.open(fileobj=io.BytesIO(done.stdout)).extractall(into, filter="data")
    package = into / BASELINE_PACKAGE
    (into / "parcae").rename(package)
    own_imports = re.compile(r"^(\s*)(from|import)(\s+)parcae(?=[\s.])", re.M)
    for path in package.rglob("*.py"):
        path.write_text(own_imports.sub(rf"\1\2\3{BASELINE_PACKAGE}", path.read_text()))
    sys.path.insert(0, str(into))
    try:
        return importlib.import_module(BASELINE_PACKAGE)
    except Exception as err:  # noqa: BLE001 — reported, the other engines still run
        return f"import of {ref}'s package failed: {type(err).__name__}: {err}"


def baseline_engine_factory(package, model):
    """today's Engine at fixed depth, on today's LoopedLM holding ``model``'s weights."""
    old_model = importlib.import_module(f"{BASELINE_PACKAGE}.model")
    old_engine = importlib.import_module(f"{BASELINE_PACKAGE}.inference")
    fields = {f.name for f in dataclasses.fields(old_model.ModelConfig)}
    config = old_model.ModelConfig(**{k: v for k, v in dataclasses.asdict(model.config).items() if k in fields})
    state = model.state_dict()
    if hasattr(old_model.LoopedLM, "from_state_dict"):
        twin = old_model.LoopedLM.from_state_dict(config, state)
    else:
        twin = old_model.LoopedLM(config)
        twin.load_state_dict(state)
    twin = twin.to(next(model.parameters()).device).eval()
    return lambda loops: old_engine.Engine(twin, loops=loops)


def compile_supported() -> bool:
    from parcae.inference import Engine

    return "compile" in inspect.signature(Engine.__init__).parameters


# -- models and prompts ----------------------------------------------------------------------------------------
def random_model(config, seed: int = 0):
    """``LoopedLM(config)`` with random weights (seed ``seed``), eval mode: the scaled-zero init's output projections
    (all zero, which would make attention and MLPs no-ops) are drawn from N(0, 0.02) as benchmarks/generate.py does."""
    from parcae.model import LoopedLM

    torch.manual_seed(seed)
    model = LoopedLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2 and not p.abs().sum():
                p.normal_(0, 0.02)
    return model


def load_model(name: str, args, device: str):
    """(model, prompts of args.prompt_tokens tokens, new tokens) for ``demo`` or a preset name."""
    if name == "demo":
        from parcae.runs import load_checkpoint

        if not args.ckpt_path:
            raise SystemExit("decode_speed: --models demo needs --ckpt_path (e.g. checkpoints/mini_demo/last.ckpt)")
        loaded = load_checkpoint(args.ckpt_path, device)
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from elastic_depth import held_out_ids

        ids = held_out_ids(loaded.tokenizer, args.work, 8 * args.prompt_tokens + 8)
        prompts = [ids[i * args.prompt_tokens: (i + 1) * args.prompt_tokens] for i in range(8)]
        return loaded.model.eval(), prompts, args.new_tokens
    from parcae.model import preset

    model = random_model(preset(name)).to(device)
    g = torch.Generator().manual_seed(1)
    prompts = [[0, *torch.randint(3, model.config.vocab_size, (args.prompt_tokens - 1,), generator=g).tolist()]
               for _ in range(8)]
    return model, prompts, args.preset_new_tokens


# -- one measurement -------------------------------------------------------------------------------------------
def timed_stream(engine, prompts, new_tokens: int) -> dict:
    """Wall time of one greedy stream (each step reads its tokens back, so the device is in step with the clock)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    tokens = [[] for _ in prompts]
    start = first = time.perf_counter()
    for i, event in enumerate(engine.stream(prompts, new_tokens)):
        if i == 0:
            first = time.perf_counter()
        for b, t in enumerate(event.tokens):
            tokens[b].append(t)
    end = time.perf_counter()
    n = len(prompts) * new_tokens
    return {"seconds": end - start, "tokens_per_s": n / (end - start),
            "decode_tokens_per_s": len(prompts) * (new_tokens - 1) / (end - first) if new_tokens > 1 else None,
            "tokens": tokens}


def measure_model(name: str, args, baseline) -> list[dict]:
    from parcae.inference import Engine

    model, prompts, new_tokens = load_model(name, args, args.device)
    mu = model.config.mean_recurrence
    builders, unavailable = {}, {}
    if "today" in args.engines:
        if isinstance(baseline, str):
            unavailable["today"] = baseline
        else:
            make_old = baseline_engine_factory(baseline, model)
            builders["today"] = lambda: make_old(mu)
    if "eager" in args.engines:
        builders["eager"] = lambda: Engine(model, loops=mu)
    if "compiled" in args.engines:
        if compile_supported():
            builders["compiled"] = lambda: Engine(model, loops=mu, compile=True)
        else:
            unavailable["compiled"] = "compile unavailable: this checkout's Engine has no compile parameter"
    for engine_name, why in unavailable.items():
        print(f"[decode_speed] {name}: {engine_name}: {why}", flush=True)

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        engines, setup = {}, {}
        for engine_name, build in builders.items():  # construction time (the compiled engine may compile here)
            start = time.perf_counter()
            try:
                engines[engine_name] = build()
                setup[engine_name] = {"construct_s": time.perf_counter() - start}
            except Exception as err:  # noqa: BLE001 — reported in the table, the other engines still run
                unavailable[engine_name] = f"construction failed: {type(err).__name__}: {str(err)[:300]}"
                print(f"[decode_speed] {name}: {engine_name}: {unavailable[engine_name]}", flush=True)
        reference, warm = {}, {}
        for batch in args.batches:
            for engine_name in list(engines):
                start = time.perf_counter()
                try:
                    run = timed_stream(engines[engine_name], prompts[:batch], new_tokens)
                except Exception as err:  # noqa: BLE001
                    unavailable[engine_name] = f"warm-up failed: {type(err).__name__}: {str(err)[:300]}"
                    print(f"[decode_speed] {name}: {engine_name}: {unavailable[engine_name]}", flush=True)
                    del engines[engine_name]
                    continue
                warm[(engine_name, batch)] = time.perf_counter() - start
                reference.setdefault(batch, run["tokens"])  # the first engine's (today's when it runs)
                setup[engine_name][f"same_tokens_batch{batch}"] = run["tokens"] == reference[batch]
                print(f"[decode_speed] {name} threads {threads} batch {batch} {engine_name}: warm-up "
                      f"{warm[(engine_name, batch)]:.2f} s", flush=True)
        runs: dict[tuple[str, int], list[dict]] = {}
        order = list(engines)
        for r in range(args.rounds):
            turn = order[r % len(order):] + order[:r % len(order)] if order else []
            for batch in args.batches:
                for engine_name in turn:
                    run = timed_stream(engines[engine_name], prompts[:batch], new_tokens)
                    run.pop("tokens")
                    runs.setdefault((engine_name, batch), []).append(run)
            print(f"[decode_speed] {name} threads {threads}: round {r + 1}/{args.rounds} done", flush=True)
        for engine_name in args.engines:
            for batch in args.batches:
                row = {"model": name, "engine": engine_name, "threads": threads, "batch": batch,
                       "loops": mu, "new_tokens": new_tokens, "prompt_tokens": args.prompt_tokens}
                if (engine_name, batch) not in runs:
                    row["unavailable"] = unavailable.get(engine_name, "not run")
                    rows.append(row)
                    continue
                done = runs[(engine_name, batch)]
                median_s = statistics.median(d["seconds"] for d in done)
                row.update(tokens_per_s=statistics.median(d["tokens_per_s"] for d in done),
                           decode_tokens_per_s=statistics.median(d["decode_tokens_per_s"] or 0 for d in done),
                           ms_per_step=1000 * median_s / new_tokens, all_tokens_per_s=[d["tokens_per_s"] for d in done],
                           warmup_s=warm[(engine_name, batch)],
                           warmup_minus_median_s=warm[(engine_name, batch)] - median_s,
                           construct_s=setup[engine_name]["construct_s"],
                           same_tokens_as_first_engine=setup[engine_name][f"same_tokens_batch{batch}"])
                rows.append(row)
        for row in rows:
            if row["threads"] == threads and "tokens_per_s" in row:
                base = next((b for b in rows if b["threads"] == threads and b["batch"] == row["batch"]
                             and b["engine"] == "today" and "tokens_per_s" in b), None)
                if base is not None:
                    row["vs_today"] = row["tokens_per_s"] / base["tokens_per_s"]
                    row["decode_vs_today"] = row["decode_tokens_per_s"] / base["decode_tokens_per_s"]
    del model
    return rows


def target_note(row: dict) -> str:
    target = TARGETS.get((row["engine"], row["batch"]))
    if row["model"] != "demo" or target is None or "vs_today" not in row:
        return ""
    got = row["vs_today"]
    return f">= {target:g}x: met" if got >= target else f">= {target:g}x: missed by {target - got:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt_path", default=None, help="the trained demo model (for --models demo)")
    p.add_argument("--models", nargs="+", default=["demo", "parcae-140m"], help="demo and/or preset names")
    p.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    p.add_argument("--baseline_ref", default="ec2adf8", help="the commit whose engine is 'today'")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], choices=range(1, 9))
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=64, help="new tokens per row, demo model")
    p.add_argument("--preset_new_tokens", type=int, default=16, help="new tokens per row, preset models")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--work", default="tempest", help="held-out play for the demo model's prompts")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/decode_speed.json"))
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("decode_speed: --device cuda but torch.cuda.is_available() is False")
    if not args.ckpt_path and "demo" in args.models:
        raise SystemExit("decode_speed: --models demo needs --ckpt_path (e.g. checkpoints/mini_demo/last.ckpt)")
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="decode_speed_"))
    try:
        baseline = baseline_package(args.baseline_ref, tmp) if "today" in args.engines else None
        rows = [row for name in args.models for row in measure_model(name, args, baseline)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"\n{'model':<12} {'thr':>3} {'batch':>5} {'engine':<9} {'tok/s':>8} {'decode':>8} {'ms/step':>8} "
          f"{'x today':>7} {'warm-up s':>9} {'build s':>7} {'same':>5}  target (demo model)")
    for r in rows:
        if "unavailable" in r:
            print(f"{r['model']:<12} {r['threads']:>3} {r['batch']:>5} {r['engine']:<9} {r['unavailable']}")
            continue
        vs = f"{r['vs_today']:.2f}" if "vs_today" in r else "-"
        print(f"{r['model']:<12} {r['threads']:>3} {r['batch']:>5} {r['engine']:<9} {r['tokens_per_s']:8.1f} "
              f"{r['decode_tokens_per_s']:8.1f} {r['ms_per_step']:8.2f} {vs:>7} {r['warmup_s']:9.2f} "
              f"{r['construct_s']:7.2f} {str(r['same_tokens_as_first_engine']):>5}  {target_note(r)}")
    payload = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "baseline_ref": args.baseline_ref,
               "device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
               "load_average_at_end": os.getloadavg(), "torch": torch.__version__, "rounds": args.rounds,
               "wall_s": time.time() - started, "targets_vs_today_demo": {f"{e} batch {b}": t
                                                                          for (e, b), t in TARGETS.items()},
               "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {args.out} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
