"""What adaptive depth costs besides the iterations: generation tokens/s with depths forced by
:class:`parcae.inference.exits.ForcedDepth` (KV policy latest, the default with an exit rule) against fixed depth,
at batch 1 and 8, on the demo architecture (``mini-demo``, random weights: the speed does not depend on them).

    python benchmarks/exit_overhead.py --threads 1          # ~3 minutes on a quiet core

At equal depth the ratio adaptive / fixed is the bookkeeping's price (per iteration: the row gather, the fallback
read of the latest policy, the exit check's state comparison, one device read); the mixed setting (every token a
different depth in 1..8, mean 4.5) against fixed μ_rec = 8 is what an exit rule that saves ~44% of the iterations
would gain. Settings run interleaved; the figure is the median of the repeats. Writes <out>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from parcae.inference import Engine
from parcae.inference.exits import ForcedDepth
from parcae.model import LoopedLM, preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini-demo")
    p.add_argument("--new_tokens", type=int, default=48)
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/exit_overhead"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = LoopedLM(preset(args.preset)).eval()
    mu = model.config.mean_recurrence
    prompts = [[0, *torch.randint(3, model.config.vocab_size, (args.prompt_tokens,)).tolist()] for _ in range(8)]
    mixed = lambda n, r: 1 + (3 * n + 5 * r) % mu  # noqa: E731  every depth 1..μ, mean (μ + 1) / 2
    settings = {f"fixed T={T}": (lambda T=T: Engine(model, loops=T)) for T in (mu, mu // 2, 1)}
    settings |= {f"forced depth {T}": (lambda T=T: Engine(model, exit=ForcedDepth(lambda n, r: T), max_loops=mu))
                 for T in (mu, mu // 2, 1)}
    settings[f"forced mixed 1..{mu}"] = lambda: Engine(model, exit=ForcedDepth(mixed), max_loops=mu)
    times: dict[tuple, list[float]] = {}
    for _ in range(args.repeats):
        for label, make in settings.items():
            for batch in (1, 8):
                engine, tokens = make(), 0
                start = time.perf_counter()
                for i in range(0, 8, batch):
                    for g in engine.generate(prompts[i:i + batch], args.new_tokens, sequences=list(range(i, i + batch))):
                        tokens += len(g.tokens)
                times.setdefault((label, batch), []).append(tokens / (time.perf_counter() - start))
    rows = []
    for (label, batch), values in times.items():
        base = statistics.median(times[(f"fixed T={mu}", batch)])
        rows.append({"setting": label, "batch": batch, "tokens_per_s": statistics.median(values),
                     "vs_fixed_mu": statistics.median(values) / base, "all": values})
        print(f"[overhead] batch {batch} {label:<18} {rows[-1]['tokens_per_s']:8.1f} tok/s  "
              f"{rows[-1]['vs_fixed_mu']:.2f}x fixed T={mu}", flush=True)
    payload = {"preset": args.preset, "mean_recurrence": mu, "new_tokens": args.new_tokens,
               "machine": f"{platform.processor() or platform.machine()}, {args.threads} thread(s), shared",
               "date": date.today().isoformat(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
