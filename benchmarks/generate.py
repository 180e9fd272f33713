"""Generation speed: KV-cached engine vs recomputing the context (today's `parcae predict` before the engine),
KV-cache bytes per token for each policy, per-token latency at batch 1 and tokens/s at batch 8.

parcae-140m with random weights, fp32, greedy, T = 8 loops per token, a 32-token prompt generated to 1,024 tokens.
The uncached generator runs one full forward over the whole context per new token; on a small CPU that takes
hours to 1,024 tokens, so by default it is *timed* on single forwards at a few context lengths, t(L) is fitted
as a + b·L + c·L² and summed over L = 32 .. 1,023 (``--uncached_full`` times the real thing instead).

    python benchmarks/generate.py                        # ~15 minutes on one busy CPU core
    python benchmarks/generate.py --preset parcae-debug --new_tokens 64 --threads 1    # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from parcae.inference import Engine
from parcae.model import LoopedLM, preset


def cached_seconds(model, prompt, new_tokens, loops, batch=1):
    engine = Engine(model, loops=loops)
    start = time.perf_counter()
    n = 0
    for _ in engine.stream([prompt] * batch, new_tokens):
        n += 1
    return time.perf_counter() - start, n


@torch.no_grad()
def uncached_step_seconds(model, length, loops, repeats=1):
    ids = torch.randint(3, model.config.vocab_size, (1, length))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids, loops=loops).logits[:, -1].argmax(-1)
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def uncached_generate_seconds(model, prompt, new_tokens, loops):
    ids = torch.tensor([prompt])
    start = time.perf_counter()
    for _ in range(new_tokens):
        nxt = model(ids, loops=loops).logits[:, -1, : model.config.vocab_size].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], 1)
    return time.perf_counter() - start


def kv_bytes_per_token(model, loops, policies, capacity=64):
    rows = []
    for policy in policies:
        adaptive = policy != "fixed"
        engine = Engine(model, exit="kl", max_loops=loops, kv_policy=policy) if adaptive else Engine(model, loops=loops)
        cache = engine.new_cache(1, capacity)
        cols = torch.arange(capacity)[None]
        ids = torch.randint(3, model.config.vocab_size, (1, capacity))
        engine.forward(cache, ids, cols, cols, torch.ones(1, capacity, dtype=torch.bool), torch.tensor([0]),
                       adaptive=False, need_logits=False)
        c = model.config
        per_entry = 2 * c.kv_heads * c.head_dim * 4  # key + value, fp32
        rows.append({"policy": f"{policy} (T={loops})", "measured_bytes_per_token": cache.nbytes() / capacity,
                     "entries_by_shape": cache.entries_per_token_by_shape(loops),
                     "bytes_by_shape": cache.entries_per_token_by_shape(loops) * per_entry})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="parcae-140m")
    p.add_argument("--loops", type=int, default=8)
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--total_tokens", type=int, default=1024)
    p.add_argument("--batch8_tokens", type=int, default=128, help="new tokens per row for the batch-8 figure")
    p.add_argument("--threads", type=int, default=1, help="1 is fastest for token-at-a-time steps on a shared CPU")
    p.add_argument("--uncached_full", action="store_true", help="time real uncached generation to total_tokens")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/generate.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LoopedLM(preset(args.preset)).eval()
    with torch.no_grad():  # the zero-initialised output projections would make attention and MLPs no-ops
        for name, p_ in model.named_parameters():
            if p_.dim() == 2 and not p_.abs().sum():
                p_.normal_(0, 0.02)
    T, P, N = args.loops, args.prompt_tokens, args.total_tokens
    prompt = [0] + torch.randint(3, model.config.vocab_size, (P - 1,)).tolist()
    new = N - P
    result = {"preset": args.preset, "loops": T, "prompt_tokens": P, "total_tokens": N, "threads": args.threads,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
              "load_average_at_start": os.getloadavg(), "date": str(date.today()), "torch": torch.__version__}
    print(f"[bench] {args.preset}, T={T}: cached generation {P} -> {N} tokens ...", flush=True)
    secs, n = cached_seconds(model, prompt, new, T)
    result["cached"] = {"seconds": secs, "new_tokens": n, "tokens_per_s": n / secs, "ms_per_token": 1000 * secs / n}
    print(f"[bench] cached: {n / secs:.2f} tokens/s ({1000 * secs / n:.1f} ms/token)", flush=True)

    if args.uncached_full:
        secs = uncached_generate_seconds(model, prompt, new, T)
        result["uncached"] = {"seconds": secs, "tokens_per_s": new / secs, "method": "measured"}
    else:
        lengths = [32, 64, 128, 256]
        times = [uncached_step_seconds(model, L, T) for L in lengths]
        print(f"[bench] uncached forward times at L={lengths}: {[round(t, 3) for t in times]} s", flush=True)
        coef = np.polyfit(lengths, times, 2)
        total = float(sum(np.polyval(coef, L) for L in range(P, N)))
        # the short range is also measured for real, as a check on the fit
        short = min(16, new)
        measured_short = uncached_generate_seconds(model, prompt, short, T)
        fitted_short = float(sum(np.polyval(coef, L) for L in range(P, P + short)))
        result["uncached"] = {"seconds": total, "tokens_per_s": new / total,
                              "method": f"t(L) = a + bL + cL^2 fitted to single forwards at L = {lengths}, summed "
                                        f"over L = {P}..{N - 1}",
                              "forward_seconds": dict(zip(map(str, lengths), times)), "fit": coef.tolist(),
                              f"check_measured_{P}_to_{P + short}_seconds": measured_short,
                              f"check_fitted_{P}_to_{P + short}_seconds": fitted_short}
        secs_short, _ = cached_seconds(model, prompt, short, T)
        result["short_range"] = {"new_tokens": short, "cached_seconds": secs_short, "uncached_seconds": measured_short,
                                 "speedup_measured": measured_short / secs_short}
    result["speedup"] = result["uncached"]["seconds"] / result["cached"]["seconds"]
    print(f"[bench] uncached: {result['uncached']['tokens_per_s']:.3f} tokens/s; cached/uncached = "
          f"{result['speedup']:.1f}x", flush=True)

    secs, n = cached_seconds(model, prompt, args.batch8_tokens, T, batch=8)
    result["batch8"] = {"new_tokens_per_row": n, "seconds": secs, "tokens_per_s": 8 * n / secs}
    print(f"[bench] batch 8: {8 * n / secs:.2f} tokens/s", flush=True)
    result["kv_cache"] = kv_bytes_per_token(model, T, ["fixed", "full", "latest", "ring:4", "ring:2"])
    for row in result["kv_cache"]:
        print(f"[bench] KV {row['policy']}: {row['measured_bytes_per_token']:,.0f} B/token allocated, "
              f"{row['bytes_by_shape']:,} by shape ({row['entries_by_shape']} block entries)", flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written: {args.output}")


if __name__ == "__main__":
    main()
