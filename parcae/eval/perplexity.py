"""Perplexity of a plain-text file at chosen loop counts: token-level, word-level (as WikiText is reported) and bits
per byte.

    parcae perplexity --ckpt_path checkpoints/run/last.ckpt --text wiki.test.raw --loops 1,4,8
    parcae perplexity --ckpt_path ... --text held_out.txt --exit kl:1e-3 --max_loops 16 --kv_policy latest

With ``--exit`` every token is decoded teacher-forced through the KV-cached engine (parcae.inference.elastic) with
its own adaptive depth; the table then reports the loss and the mean loops per token.

The text is tokenized once (``<|bos|>`` first) and scored in consecutive windows of ``block_size`` predicted tokens;
each window after the first is given the last ``context`` tokens before it as conditioning (lm-eval's rolling
log-likelihood uses 1 token; more context lowers the number a little). From the total negative log-likelihood NLL:

* token perplexity  = exp(NLL / predicted tokens)            (tokenizer-dependent)
* word perplexity   = exp(NLL / words)                         (words = whitespace-separated; lm-eval's WikiText metric)
* bits per byte     = NLL / (ln 2 · UTF-8 bytes of the text)   (vocabulary-independent)
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch

from parcae.data.tokenizer import encode_prompt
from parcae.errors import UsageError
from parcae.inference.options import DepthOptions
from parcae.model.loss import IGNORE_INDEX, token_nll


@torch.no_grad()
def text_nll(model, token_ids: Sequence[int], loops: Optional[int], window: int, context: int = 1,
             batch_size: int = 8) -> tuple[float, int]:
    """Total NLL (nats) of token_ids[1:] given everything before, scored in windows; returns (nll, predicted)."""
    ids = torch.tensor(token_ids, dtype=torch.long)
    if len(ids) < 2:
        raise ValueError("the text is too short to score (fewer than 2 tokens)")
    if not 0 < context < window:
        raise ValueError(f"context must be in [1, window), got {context} for window {window}")
    device = next(model.parameters()).device
    # Window k predicts positions [start, end) from inputs [start - ctx, end - 1].
    jobs = []
    start = 1
    while start < len(ids):
        end = min(start + window - context, len(ids)) if start > 1 else min(window, len(ids))
        ctx_start = max(0, start - context) if start > 1 else 0
        jobs.append((ctx_start, start, end))
        start = end
    total, count = 0.0, 0
    for i in range(0, len(jobs), batch_size):
        chunk = jobs[i:i + batch_size]
        width = max(e - c for c, _, e in chunk)
        inputs = torch.zeros(len(chunk), width, dtype=torch.long)
        targets = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, (c, s, e) in enumerate(chunk):
            inputs[row, : e - c - 1] = ids[c: e - 1]
            targets[row, s - c - 1: e - c - 1] = ids[s:e]
        kwargs = {"loops": loops} if model.config.looped else {}
        logits = model(inputs.to(device), **kwargs).logits  # h₀ of (seed 0, position): the same at any batch size
        total += token_nll(logits, targets.to(device), model.config.vocab_size, reduction="sum").item()
        count += int((targets != IGNORE_INDEX).sum())
    return total, count


def text_perplexity(model, tokenizer, text: str, loops_list: Sequence[Optional[int]], window: Optional[int] = None,
                    context: int = 1) -> list[dict]:
    ids = encode_prompt(tokenizer, text)
    words = len([w for w in re.split(r"\s+", text) if w])
    nbytes = len(text.encode("utf-8"))
    window = window or model.config.block_size
    rows = []
    for loops in loops_list:
        nll, n = text_nll(model, ids, loops, window, context)
        rows.append({"loops": loops, "tokens": n, "words": words, "bytes": nbytes,
                     "token_perplexity": math.exp(nll / n), "word_perplexity": math.exp(nll / words),
                     "bits_per_byte": nll / (math.log(2) * nbytes), "nll": nll})
    return rows


def perplexity(*, ckpt_path: str, text: Path, loops: Optional[str] = None, window: Optional[int] = None,
               context: int = 1, device: str = "cuda" if torch.cuda.is_available() else "cpu",
               tokenizer: Optional[str] = None, output_dir: Optional[str] = None,
               depth: DepthOptions = DepthOptions(), compile: bool = False) -> None:
    """Token/word perplexity and bits per byte of a text file at chosen loops (or adaptive depth with --exit).

    Args:
        ckpt_path: the checkpoint to score with.
        text: a UTF-8 plain-text file (e.g. WikiText-103 wiki.test.raw).
        loops: loop counts: comma list / ranges, e.g. 1,4,8 or 1-16 (default: μ_rec).
        window: tokens per window (default: the model's block_size).
        context: tokens of preceding context for each later window.
        device: cpu, cuda, cuda:1, ...
        tokenizer: tokenizer.json (default: the run's own or its data folder's).
        output_dir: folder for perplexity_<text>.json (default: the checkpoint's folder when writable).
        depth: with --exit: adaptive depth through the generation engine (--exit, --min_loops, --max_loops,
            --kv_policy, --continuous).
        compile: with --exit: score through the engine's compiled step (torch.compile, static shapes).
    """
    args = SimpleNamespace(ckpt_path=ckpt_path, text=text, loops=loops, window=window, context=context,
                           device=device, tokenizer=tokenizer, output_dir=output_dir, compile=compile)
    if depth.exit is not None:
        return _main_elastic(args, depth)
    if compile:
        raise UsageError("--compile applies to perplexity --exit (token-by-token scoring through the engine); at "
                         "fixed loops each window is one forward, with nothing per token to compile")
    from parcae.model import parse_loops
    from parcae.options import check_options, loop_cost_note
    from parcae.runs import load_checkpoint, perplexity_result, results_dir_for, write_text_atomically

    try:
        check_options(window=(args.window, 1), context=(args.context, 1))
        if args.window is not None and args.context >= args.window:
            raise ValueError(f"--context {args.context} must be smaller than --window {args.window}")
        requested = parse_loops(args.loops) if args.loops is not None else None
        if not args.text.is_file():
            raise FileNotFoundError(f"--text {args.text}: no such file")
        out_dir, note = results_dir_for(args.ckpt_path, args.output_dir)
        run = load_checkpoint(args.ckpt_path, args.device, args.tokenizer)
        model, tokenizer = run.model, run.tokenizer  # load_checkpoint checked that it fits the model
        loops = requested or [model.config.mean_recurrence]
        cost = loop_cost_note(loops, model.config.mean_recurrence)
        if cost:
            print(f"[parcae] {cost}", flush=True)
        if not model.config.looped:
            if loops not in ([1], [model.config.mean_recurrence]):
                raise ValueError(f"--loops: {model.config.name} is a fixed-depth model")
            loops = [None]
        text = args.text.read_text(encoding="utf-8")
        rows = text_perplexity(model, tokenizer, text, loops, args.window, args.context)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as err:
        raise UsageError(str(err)) from None
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.text.name}: {rows[0]['words']:,} words, {rows[0]['tokens']:,} tokens")
    for col in ("loops", "token ppl", "word ppl", "bits/byte"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["loops"] or "-"), f"{r['token_perplexity']:.3f}", f"{r['word_perplexity']:.3f}",
                      f"{r['bits_per_byte']:.4f}")
    Console().print(table)
    if out_dir is None:
        print(f"[parcae] {note}")
        return
    out = out_dir / perplexity_result(args.text)
    write_text_atomically(out, json.dumps({"text": str(args.text), "checkpoint": str(run.checkpoint),
                                           "results": rows}, indent=2) + "\n")
    print(f"written: {out}")


def _main_elastic(args, depth: DepthOptions) -> None:
    """perplexity --exit: teacher-forced decoding through the engine; loss and mean loops per token."""
    from parcae.inference.elastic import elastic_nll
    from parcae.runs import load_checkpoint, perplexity_result, results_dir_for, write_text_atomically

    try:
        if args.loops:
            raise ValueError("give either --loops or --exit, not both")
        out_dir, note = results_dir_for(args.ckpt_path, args.output_dir)  # before the work
        run = load_checkpoint(args.ckpt_path, args.device, args.tokenizer)
        model, tok = run.model, run.tokenizer
        engine = depth.engine(model, compile=args.compile)
        text = args.text.read_text(encoding="utf-8")
        ids = encode_prompt(tok, text)
        row = elastic_nll(engine, ids, args.window or model.config.block_size)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as err:
        raise UsageError(str(err)) from None
    print(f"{args.text.name}: exit {row['exit']} (max_loops {row['max_loops']}, kv {row['kv_policy']}): "
          f"loss {row['loss']:.4f} nats/token, token ppl {row['perplexity']:.3f}, mean loops/token "
          f"{row['mean_loops']:.2f} over {row['tokens']:,} tokens")
    if out_dir is None:
        print(note)
        return
    out = out_dir / perplexity_result(args.text, exit_rule=True)
    write_text_atomically(out, json.dumps({"text": str(args.text), "results": [row]}, indent=2) + "\n")
    print(f"written: {out}")

