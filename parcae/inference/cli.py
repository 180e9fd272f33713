"""``parcae generate``: text from a trained checkpoint with the KV-cached engine, at fixed or adaptive depth.

    parcae generate --ckpt_path checkpoints/mini_demo/last.ckpt --prompt "ROMEO:" --loops 8
    parcae generate --ckpt_path ... --prompt "ROMEO:" --exit latent-diff:0.05 --max_loops 32 --kv_policy latest --show_depth
    parcae generate --ckpt_path ... --prompts prompts.jsonl --output out.jsonl --batch_size 8

A single ``--prompt`` streams its continuation to the terminal; ``--prompts FILE.jsonl`` (one {"prompt": ...} or
{"text": ...} per line) is generated in batches and written as JSON lines (to ``--output``, else to stdout). The
output file is ``out.jsonl.partial`` until every prompt is done (an interrupt keeps the finished records there);
an existing ``--output`` is refused unless ``--overwrite``.
Every prompt starts with <|bos|>; an empty prompt is just <|bos|>. A special token's spelling in a prompt
(``<|eos|>``) is plain text unless ``--special_tokens``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from parcae.data.tokenizer import TextStream, encode_prompt, stop_ids
from parcae.errors import UsageError
from parcae.runs.output import RecordFile, check_writable_output

from .engine import Engine, Sampling, SpeculationStats
from .options import DepthOptions


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


def generate(*, ckpt_path: str, prompt: Optional[str] = None, prompts: Optional[Path] = None,
             output: Optional[Path] = None, overwrite: bool = False, batch_size: int = 8,
             depth: DepthOptions = DepthOptions(), speculate: Optional[str] = None,
             max_new_tokens: int = 200, temperature: float = 0.8, top_k: int = 50, top_p: Optional[float] = None,
             seed: int = 0, show_depth: bool = False, device: str = "cuda" if torch.cuda.is_available() else "cpu",
             tokenizer: Optional[str] = None, special_tokens: bool = False, compile: bool = False) -> None:
    """Generate text with the KV-cached engine, at fixed or adaptive depth.

    Args:
        ckpt_path: the checkpoint (a run directory's last.ckpt, step=*.ckpt, or an imported run's).
        prompt: text to continue ("" starts from <|bos|> alone); streamed to the terminal.
        prompts: JSON lines with a 'prompt' (or 'text') field each; generated in batches.
        output: with --prompts: JSON lines file (default: stdout); out.jsonl.partial until every prompt is done.
        overwrite: replace an existing --output file (without it, an existing file is refused).
        batch_size: with --prompts: prompts generated together.
        depth: loop iterations per token (flags --loops, --exit, --min_loops, --max_loops, --kv_policy, --continuous).
        speculate: DRAFT_LOOPS:K: self-speculative decoding: draft K tokens at DRAFT_LOOPS loops, verify them at
            --loops.
        max_new_tokens: tokens to generate per prompt.
        temperature: 0 for greedy decoding.
        top_k: sample among the k most likely tokens (0: all).
        top_p: nucleus sampling mass in (0, 1].
        seed: sampling and initial-state seed.
        show_depth: print loops used per token (mean and histogram).
        device: cpu, cuda, cuda:1, ...
        tokenizer: tokenizer.json (default: the run's own or its data folder's).
        special_tokens: read special-token spellings in the prompts (<|eos|>, <|bos|>) as the control tokens; by
            default they are plain text.
        compile: decode through torch.compile with static shapes (the same tokens; the first run compiles for
            tens of seconds, later runs load the compiled step from ~/.cache/parcae/inductor).
    """
    if (prompt is None) == (prompts is None):
        raise UsageError("give --prompt TEXT or --prompts FILE.jsonl (one of them)")
    try:
        if max_new_tokens < 0:
            raise ValueError(f"--max_new_tokens must be >= 0, got {max_new_tokens}")
        if batch_size < 1:
            raise ValueError(f"--batch_size must be >= 1, got {batch_size}")
        texts = [prompt] if prompt is not None else _read_prompts(prompts)
        if output is not None:
            check_writable_output(output, overwrite)
        from parcae.runs import load_checkpoint

        run = load_checkpoint(ckpt_path, device, tokenizer)
        model, tok = run.model, run.tokenizer
        engine = Engine.from_options(model, depth, seed=seed, speculate=speculate, compile=compile)
        sampling = Sampling(temperature=temperature, top_k=top_k or None, top_p=top_p, seed=seed)
        encoded = [encode_prompt(tok, t, special_tokens=special_tokens) for t in texts]
        engine.check_request(encoded, max_new_tokens)
    except (FileNotFoundError, ValueError, UnicodeDecodeError) as err:
        raise UsageError(str(err)) from None
    stop = stop_ids(tok)
    all_depths: list[int] = []
    speculation = SpeculationStats()  # added up over the prompts (with --speculate)
    if prompt is not None:
        out = sys.stdout
        out.write(prompt)
        out.flush()
        text = TextStream(tok)  # pieces never end inside a multi-byte character
        last = None
        for last in engine.stream(encoded, max_new_tokens, sampling, stop):
            all_depths.append(last.depths[0])
            out.write(text.push(last.tokens[0]))
            out.flush()
        out.write("\n")
        if last is not None and last.speculation is not None:
            speculation = last.speculation[0]
    else:
        # a file is complete or named out.jsonl.partial (an interrupt keeps the finished records)
        records = RecordFile(output, expected=len(encoded), overwrite=overwrite) if output else None
        emit = records.write if records else functools.partial(print, flush=True)
        with records or contextlib.nullcontext():
            for start in range(0, len(encoded), batch_size):
                batch = encoded[start:start + batch_size]
                results = engine.generate(batch, max_new_tokens, sampling, stop,
                                          sequences=list(range(start, start + len(batch))))
                for i, r in enumerate(results):
                    all_depths += r.depths
                    speculation = speculation + (r.speculation or SpeculationStats())
                    emit(json.dumps({"prompt": texts[start + i],
                                     "completion": tok.decode(r.tokens, skip_special_tokens=True),
                                     "tokens": len(r.tokens), "loops": r.depths, "stopped": r.stopped}))
                print(f"[generate] {min(start + batch_size, len(encoded))}/{len(encoded)} prompts",
                      file=sys.stderr, flush=True)
        if output:
            print(f"written: {output}", file=sys.stderr)
    if show_depth:
        print(depth_summary(all_depths), file=sys.stderr)
    if engine.speculate is not None:
        s = speculation
        print(f"[speculate] draft {engine.speculate[0]} loops, {engine.speculate[1]} per round: accepted "
              f"{s.accepted}/{s.drafted} drafts ({s.acceptance:.0%}) in {s.rounds} rounds (summed over the "
              "prompts)", file=sys.stderr)

