"""``parcae generate``: text from a trained checkpoint with the KV-cached engine, at fixed or adaptive depth.

    parcae generate --ckpt_path checkpoints/mini_demo/last.ckpt --prompt "ROMEO:" --loops 8
    parcae generate --ckpt_path ... --prompt "ROMEO:" --exit latent-diff:0.05 --max_loops 32 --kv_policy latest --show_depth
    parcae generate --ckpt_path ... --prompts prompts.jsonl --output out.jsonl --batch_size 8

A single ``--prompt`` streams its continuation to the terminal; ``--prompts FILE.jsonl`` (one {"prompt": ...} or
{"text": ...} per line) is generated in batches and written as JSON lines (to ``--output``, else to stdout).
Every prompt starts with <|bos|>; an empty prompt is just <|bos|>.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from parcae.data.tokenizer import encode_prompt

from .engine import Engine, Sampling


def add_depth_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--loops", type=int, default=None, help="fixed loop iterations per token (default: μ_rec)")
    p.add_argument("--exit", default=None, metavar="RULE[:THRESHOLD]",
                   help="adaptive depth: latent-diff (auto 0.03), cosine (1e-3), kl (1e-3), minp-kl (1e-5), "
                        "entropy-diff (1e-3), argmax-stability (5)")
    p.add_argument("--min_loops", type=int, default=1, help="with --exit: never exit before this many iterations")
    p.add_argument("--max_loops", type=int, default=None, help="with --exit: stop here at the latest (default μ_rec)")
    p.add_argument("--exit_every", type=int, default=1,
                   help="with --exit: check the rule every N iterations from --min_loops on "
                        "(Huginn's check_criterion_every_n_steps)")
    p.add_argument("--kv_policy", default=None, metavar="full|latest|ring:K",
                   help="what later tokens read for iterations an exited token skipped (default latest with --exit)")
    p.add_argument("--speculate", default=None, metavar="DRAFT_LOOPS:K",
                   help="self-speculative decoding: draft K tokens at DRAFT_LOOPS loops, verify them at --loops")
    p.add_argument("--continuous", action="store_true",
                   help="warm start: each token's initial state is the previous token's final state")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max_new_tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--top_k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top_p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling and initial-state seed")


def engine_from_args(model, args) -> Engine:
    return Engine(model, loops=args.loops, exit=args.exit, min_loops=args.min_loops, max_loops=args.max_loops,
                  kv_policy=args.kv_policy, continuous=args.continuous, seed=args.seed, exit_every=args.exit_every,
                  speculate=args.speculate)


def sampling_from_args(args) -> Sampling:
    return Sampling(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, seed=args.seed)


def depth_summary(depths: list[int]) -> str:
    """Mean loops per token and a text histogram."""
    if not depths:
        return "no tokens generated"
    counts = Counter(depths)
    width = max(counts.values())
    lines = [f"loops per token: mean {sum(depths) / len(depths):.2f} over {len(depths)} tokens"]
    for d in sorted(counts):
        lines.append(f"  {d:>3} {'#' * max(1, round(40 * counts[d] / width))} {counts[d]}")
    return "\n".join(lines)


def _read_prompts(path: Path) -> list[str]:
    prompts = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not JSON ({err.msg})") from None
        text = record.get("prompt", record.get("text")) if isinstance(record, dict) else record
        if not isinstance(text, str):
            raise ValueError(f"{path}:{n}: expected a string or an object with a 'prompt' (or 'text') string")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="parcae generate", description="Generate text with the KV-cached engine.")
    p.add_argument("--ckpt_path", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text to continue (\"\" starts from <|bos|> alone)")
    src.add_argument("--prompts", type=Path, help="JSON lines with a 'prompt' (or 'text') field each")
    p.add_argument("--output", type=Path, default=None, help="with --prompts: JSON lines file (default: stdout)")
    p.add_argument("--batch_size", type=int, default=8, help="with --prompts: prompts generated together")
    add_depth_arguments(p)
    add_sampling_arguments(p)
    p.add_argument("--show_depth", action="store_true", help="print loops used per token (mean and histogram)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json (default: the run's data folder)")
    args = p.parse_args(argv)

    def fail(message) -> None:
        sys.exit(f"parcae generate: error: {message}")

    try:
        if args.max_new_tokens < 0:
            raise ValueError(f"--max_new_tokens must be >= 0, got {args.max_new_tokens}")
        if args.batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
        texts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts)
        from parcae.runs import load_checkpoint

        run = load_checkpoint(args.ckpt_path, args.device, args.tokenizer)
        model, tok = run.model, run.tokenizer
        engine = engine_from_args(model, args)
        sampling = sampling_from_args(args)
        prompts = [encode_prompt(tok, t) for t in texts]
        engine.check_request(prompts, args.max_new_tokens)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as err:
        fail(err)
    stop = [tok.token_to_id("<|eos|>")]
    all_depths: list[int] = []
    if args.prompt is not None:
        out = sys.stdout
        out.write(args.prompt)
        out.flush()
        generated: list[int] = []
        shown = ""
        for event in engine.stream(prompts, args.max_new_tokens, sampling, stop):
            generated.append(event.tokens[0])
            all_depths.append(event.depths[0])
            text = tok.decode(generated, skip_special_tokens=True)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                out.write(text[len(shown):])
                out.flush()
                shown = text
        out.write(tok.decode(generated, skip_special_tokens=True)[len(shown):] + "\n")
    else:
        sink = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
        try:
            for start in range(0, len(prompts), args.batch_size):
                batch = prompts[start:start + args.batch_size]
                results = engine.generate(batch, args.max_new_tokens, sampling, stop,
                                          sequences=list(range(start, start + len(batch))))
                for i, r in enumerate(results):
                    all_depths += r.depths
                    sink.write(json.dumps({"prompt": texts[start + i],
                                           "completion": tok.decode(r.tokens, skip_special_tokens=True),
                                           "tokens": len(r.tokens), "loops": r.depths,
                                           "stopped": r.stopped}) + "\n")
                sink.flush()
                print(f"[generate] {min(start + args.batch_size, len(prompts))}/{len(prompts)} prompts",
                      file=sys.stderr, flush=True)
        finally:
            if args.output:
                sink.close()
        if args.output:
            print(f"written: {args.output}", file=sys.stderr)
    if args.show_depth:
        print(depth_summary(all_depths), file=sys.stderr)
    if engine.speculate is not None:
        s = engine.speculation
        print(f"[speculate] draft {engine.speculate[0]} loops, {engine.speculate[1]} per round: accepted "
              f"{s['accepted']}/{s['drafted']} drafts ({s['accepted'] / max(s['drafted'], 1):.0%}) in {s['rounds']} "
              "rounds of the last batch", file=sys.stderr)

