"""Tokens per second of vLLM (CPU build, parcae's plugin) vs parcae's own engine on the same exported model.

A random mini-parcae-shaped model with head dimension 64 (d 128, 2 heads, P/R/C 1/2/1, vocab 512), fp32, greedy,
batches of prompts generated to a fixed length with no early stop, at a fixed loop count. vLLM runs in
.venv-vllm (scripts/setup_vllm_env.sh) through tests/hf/vllm_generate.py; its figure excludes the engine start
(~45 s or more) and counts the batched call only. parcae's figure is ``Engine.generate`` on the same prompts.

    python benchmarks/vllm_vs_parcae.py                       # batch 8, 64 new tokens, 6 loops
    python benchmarks/vllm_vs_parcae.py --batch 1 --new_tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "hf")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new_tokens", type=int, default=64)
    p.add_argument("--loops", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    from hf_runs import export, make_run
    from parcae.inference import Engine
    from parcae.runs import load_checkpoint

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vllm_bench_"))
    run = make_run(work, "bench", seed=7, d_model=128, n_heads=2, d_ff=256, block_size=256)
    folder = export(run, work / "hf")
    model = load_checkpoint(run / "last.ckpt").model
    g = torch.Generator().manual_seed(0)
    prompts = [[0, *torch.randint(3, 512, (16,), generator=g).tolist()] for _ in range(args.batch)]
    (work / "prompts.json").write_text(json.dumps(prompts))

    engine = Engine(model, loops=args.loops)
    engine.generate(prompts[:1], 4)  # warm-up
    start = time.perf_counter()
    ours = engine.generate(prompts, args.new_tokens)  # no stop ids: every row runs to new_tokens
    parcae_s = time.perf_counter() - start
    parcae_tokens = sum(len(r.tokens) for r in ours)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([str(ROOT / ".venv-vllm" / "bin" / "python"), str(ROOT / "tests" / "hf" / "vllm_generate.py"),
                           str(folder), str(work / "prompts.json"), str(args.loops), str(args.new_tokens), "--ignore_eos"],
                          capture_output=True, text=True, env=env, cwd=work)
    if done.returncode:
        sys.exit(done.stderr[-3000:])
    served = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{\"batch\"")))
    same = served["batch"] == [r.tokens for r in ours]
    print(json.dumps({"date": str(date.today()), "machine": f"{platform.processor() or platform.machine()}, "
                      f"{os.cpu_count()} cores", "batch": args.batch, "new_tokens": args.new_tokens,
                      "loops": args.loops, "parcae_tokens_per_s": round(parcae_tokens / parcae_s, 1),
                      "vllm_tokens_per_s": round(served["tokens"] / served["seconds"], 1),
                      "same_tokens": same}, indent=2))


if __name__ == "__main__":
    main()
