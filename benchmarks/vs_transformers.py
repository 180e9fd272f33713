"""Tokens/s of parcae's engine against Hugging Face transformers' ``generate()`` on a model of the same shape.

parcae: the ``gpt-140m`` preset (the paper's fixed-depth baseline: d 768, 6 layers, 6 heads of 128, vocabulary
32,768, ReLU² MLP with d_ff 3,072, value embeddings) through :class:`parcae.inference.Engine`, as ``parcae
generate`` runs it. transformers: a ``LlamaForCausalLM`` of the same width, depth, heads and vocabulary, tied
embeddings, and the same MLP FLOPs (SwiGLU with intermediate 2,048: 3·768·2,048 = 2·768·3,072 multiplied
parameters). Both random weights, fp32 on the CPU, greedy, a 32-token prompt and exactly ``--new_tokens`` new
tokens (no stop token), the same thread count, batch 1 and batch 8, interleaved; the figure is the median of
``--repeats``. Value-embedding lookups and the gates are parcae's extra work (the Llama has none).

    python benchmarks/vs_transformers.py                 # ~3 minutes on 2 CPU cores
    python benchmarks/vs_transformers.py --threads 1 --repeats 2
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

from parcae.inference import Engine
from parcae.model import LoopedLM, preset


def parcae_model(name: str) -> LoopedLM:
    model = LoopedLM(preset(name)).eval()
    with torch.no_grad():  # the zero-initialised output projections would make attention and MLPs no-ops
        for p in model.parameters():
            if p.dim() == 2 and not p.abs().sum():
                p.normal_(0, 0.02)
    return model


def llama_like(model: LoopedLM):
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.config
    mlp_params = 2 * c.d_model * c.d_ff if c.mlp == "relu2" else 3 * c.d_model * c.d_ff
    config = LlamaConfig(vocab_size=c.padded_vocab_size, hidden_size=c.d_model, num_hidden_layers=c.n_layers,
                         num_attention_heads=c.n_heads, num_key_value_heads=c.kv_heads,
                         intermediate_size=mlp_params // (3 * c.d_model), max_position_embeddings=c.block_size,
                         rope_theta=c.rope_base, tie_word_embeddings=True, rms_norm_eps=c.norm_eps,
                         attn_implementation="sdpa")
    return LlamaForCausalLM(config).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="gpt-140m")
    p.add_argument("--prompt_tokens", type=int, default=32)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/vs_transformers"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ours = parcae_model(args.preset)
    theirs = llama_like(ours)
    n_ours = sum(p.numel() for n, p in ours.named_parameters() if "value_embeds" not in n)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    V = ours.config.vocab_size
    prompts = torch.randint(3, V, (8, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    engine = Engine(ours)

    def run_parcae(batch: int) -> int:
        out = engine.generate(prompts[:batch].tolist(), args.new_tokens)
        return sum(len(g.tokens) for g in out)

    @torch.no_grad()
    def run_hf(batch: int) -> int:
        ids = prompts[:batch]
        out = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                              min_new_tokens=args.new_tokens, do_sample=False, use_cache=True,
                              pad_token_id=0, eos_token_id=None)
        return (out.shape[1] - ids.shape[1]) * batch

    runners = {"parcae": run_parcae, "transformers": run_hf}
    for name, fn in runners.items():  # warm-up: first-call allocations and lazy imports
        fn(1)
    times: dict[tuple[str, int], list[float]] = {}
    for repeat in range(args.repeats):
        for batch in (1, 8):
            for name, fn in runners.items():
                start = time.perf_counter()
                tokens = fn(batch)
                times.setdefault((name, batch), []).append(tokens / (time.perf_counter() - start))
        print(f"[peer] repeat {repeat + 1}/{args.repeats}: " + ", ".join(
            f"{n} b{b} {v[-1]:.1f}" for (n, b), v in times.items()), flush=True)
    rows = []
    for batch in (1, 8):
        a, b = statistics.median(times[("parcae", batch)]), statistics.median(times[("transformers", batch)])
        rows.append({"batch": batch, "parcae_tokens_per_s": a, "transformers_tokens_per_s": b, "ratio": a / b,
                     "parcae_all": times[("parcae", batch)], "transformers_all": times[("transformers", batch)]})
        print(f"batch {batch}: parcae {a:.1f} tokens/s, transformers {b:.1f} tokens/s, ratio {a / b:.2f}x")
    import transformers

    payload = {"preset": args.preset, "parcae_matmul_parameters": n_ours, "llama_parameters": n_theirs,
               "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "threads": args.threads,
               "repeats": args.repeats, "date": str(date.today()), "torch": torch.__version__,
               "transformers": transformers.__version__,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs",
               "load_average_at_end": os.getloadavg(), "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"written: {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
