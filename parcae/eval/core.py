"""CORE and Core-Extended (DCLM in-context tasks as in nanochat and the paper, App. M / Table 15) at a chosen
loop count.

    parcae core --ckpt_path checkpoints/table5_140m_parcae/last.ckpt --bundle /data/eval_bundle --loops 8
    parcae core ... --tasks core_extended --seeds 1234,2345,3456 --max_per_task 500

The eval bundle cannot be downloaded here; get ``eval_bundle.zip`` once from
https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip (nanochat's copy of the DCLM data: ``core.yaml``,
``eval_meta_data.csv``, ``eval_data/<category>/<task>.jsonl``) and pass its folder. Nothing is downloaded.

Protocol (as the official evaluation): each task's examples are shuffled with ``Random(1337)``; few-shot examples
for item i are ``Random(seed + i).sample`` of the other items; every sequence starts with ``<|bos|>`` and is
cropped from the left to the context length. Multiple choice: the choice with the lowest mean loss over its
tokens; schema: the context option with the lowest mean loss over the shared continuation; language modelling:
the greedy prediction must reproduce the continuation exactly. Centered accuracy (acc − b)/(1 − b) with b the
random baseline of ``eval_meta_data.csv`` (25% when missing). CORE = mean over the 22 CORE tasks, Core-Extended
= mean over all 46 (tasks whose file is missing are skipped and reported); mean ± population std over seeds.
The initial recurrent state is the model's evaluation h₀ (seed 0, a function of position only), so an item scores as it
does alone, at any batch size, and as the exported model scores it.
"""

from __future__ import annotations

import csv
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

import torch
import yaml

from parcae.data.tokenizer import bos_id, encode_prompt
from parcae.model.loss import real_logits, token_nll
from parcae.errors import UsageError

TASKS_FILE = Path(__file__).with_name("core_tasks.yaml")
SEEDS = (1234, 2345, 3456)


@dataclass(frozen=True)
class Task:
    label: str
    file: str
    shots: int
    type: str
    delimiter: str = " "
    core: bool = False


def load_tasks(which: str = "core") -> list[Task]:
    """The paper's CORE (22) or Core-Extended (46) tasks, or the tasks of a bundle-format ``core.yaml`` path."""
    if which.endswith((".yaml", ".yml")):
        return tasks_from_bundle_yaml(Path(which))
    if which not in ("core", "core_extended"):
        raise ValueError(f"tasks must be 'core', 'core_extended' or a core.yaml path, got {which!r}")
    tasks = [Task(**{**t, "delimiter": t.get("delimiter", " ")}) for t in yaml.safe_load(TASKS_FILE.read_text())["tasks"]]
    return [t for t in tasks if t.core] if which == "core" else tasks


def tasks_from_bundle_yaml(path: Path) -> list[Task]:
    """Tasks from a bundle's own ``core.yaml`` (nanochat format: icl_tasks with label, dataset_uri, ...)."""
    spec = yaml.safe_load(path.read_text())
    return [Task(t["label"], t["dataset_uri"], int(t["num_fewshot"][0]), t["icl_task_type"],
                 t.get("continuation_delimiter", " "), True) for t in spec["icl_tasks"]]


def read_baselines(bundle: Path) -> dict[str, float]:
    meta = bundle / "eval_meta_data.csv"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found: is {bundle} an eval bundle folder?")
    with open(meta, newline="") as f:
        return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}


# -- prompts ----------------------------------------------------------------------------------------------------
def render(task: Task, item: dict, shots: Sequence[dict]) -> list[str]:
    """The prompt strings of one item: one per choice (MC), per context option (schema), or
    [without, with] continuation (language modelling)."""
    d = task.delimiter
    if task.type == "multiple_choice":
        prefix = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.type == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{prefix}{option}{d}{item['continuation']}" for option in item["context_options"]]
    if task.type == "language_modeling":
        prefix = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
        head = f"{prefix}{item['context'].strip()}{d}"
        # Stripping the prompt without the continuation keeps it a clean token prefix of the one with it.
        return [head.strip(), head + item["continuation"]]
    raise ValueError(f"unknown task type {task.type!r} (multiple_choice, schema, language_modeling)")


def _common(seqs: list[list[int]], from_end: bool = False) -> int:
    n = min(len(s) for s in seqs)
    for i in range(n):
        pos = -1 - i if from_end else i
        if any(s[pos] != seqs[0][pos] for s in seqs):
            return i
    return n


def spans(task: Task, token_lists: list[list[int]]) -> tuple[list[list[int]], list[tuple[int, int]]]:
    """(sequences to run, [start, end) of the scored tokens in each)."""
    if task.type == "multiple_choice":
        start = _common(token_lists)                      # shared context, different continuations
        return token_lists, [(start, len(t)) for t in token_lists]
    if task.type == "schema":
        suffix = _common(token_lists, from_end=True)      # different contexts, shared continuation
        return token_lists, [(len(t) - suffix, len(t)) for t in token_lists]
    without, with_ = token_lists
    if len(without) >= len(with_) or with_[: len(without)] != without:
        raise ValueError("language-modelling prompt without the continuation is not a token prefix of the full one")
    return [with_], [(len(without), len(with_))]


class CoreScorer:
    """Scores a :class:`parcae.model.LoopedLM` (or anything with the same call) on CORE tasks at ``loops``."""

    def __init__(self, model, tokenizer, loops: Optional[int] = None, max_seq_len: Optional[int] = None,
                 batch_size: int = 32, device: Optional[torch.device] = None) -> None:
        self.model, self.tok, self.loops = model, tokenizer, loops
        self.max_seq_len = max_seq_len or getattr(getattr(model, "config", None), "block_size", 2048)
        self.batch_size = batch_size
        self.device = device or next(model.parameters()).device
        self.pad = bos_id(tokenizer)  # right padding: any id will do, its positions are never read

    @torch.no_grad()
    def _run(self, sequences: list[list[int]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per-position losses and greedy predictions for each sequence (right-padded batches; a row's numbers are
        those it gets alone: h₀ depends on (seed 0, position) only)."""
        losses, preds = [], []
        for i in range(0, len(sequences), self.batch_size):
            chunk = sequences[i:i + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.full((len(chunk), width), self.pad, dtype=torch.long)
            for row, s in enumerate(chunk):
                ids[row, : len(s)] = torch.tensor(s)
            ids = ids.to(self.device)
            kwargs = {}
            if getattr(getattr(self.model, "config", None), "looped", True):
                kwargs["loops"] = self.loops
            logits = self.model(ids, **kwargs).logits
            vocab = getattr(getattr(self.model, "config", None), "vocab_size", logits.shape[-1])
            step_loss = token_nll(logits[:, :-1], ids[:, 1:], vocab)
            greedy = real_logits(logits, vocab).argmax(-1)
            for row, s in enumerate(chunk):
                losses.append(step_loss[row, : len(s) - 1].cpu())
                preds.append(greedy[row, : len(s) - 1].cpu())
        return losses, preds

    def evaluate_task(self, task: Task, data: list[dict], seed: int) -> float:
        """Accuracy of one task (data already shuffled and truncated)."""
        batch_seqs, batch_meta = [], []
        results = [False] * len(data)

        def flush():
            if not batch_seqs:
                return
            losses, preds = self._run(batch_seqs)
            by_item: dict[int, list] = {}
            for (idx, j, span), loss, pred, seq in zip(batch_meta, losses, preds, batch_seqs):
                by_item.setdefault(idx, []).append((j, span, loss, pred, seq))
            for idx, entries in by_item.items():
                if task.type == "language_modeling":
                    (_, (s, e), _, pred, seq), = entries
                    results[idx] = bool(torch.equal(pred[s - 1:e - 1], torch.tensor(seq[s:e])))
                else:
                    means = [loss[s - 1:e - 1].mean().item() for _, (s, e), loss, _, _ in sorted(entries, key=lambda x: x[0])]
                    results[idx] = means.index(min(means)) == data[idx]["gold"]
            batch_seqs.clear()
            batch_meta.clear()

        for idx, item in enumerate(data):
            shots = []
            if task.shots > 0:
                others = [i for i in range(len(data)) if i != idx]
                shots = [data[i] for i in random.Random(seed + idx).sample(others, min(task.shots, len(others)))]
            token_lists = [encode_prompt(self.tok, p) for p in render(task, item, shots)]
            seqs, item_spans = spans(task, token_lists)
            for j, (seq, (s, e)) in enumerate(zip(seqs, item_spans)):
                crop = max(0, len(seq) - self.max_seq_len)   # keep the end: crop the oldest context
                batch_seqs.append(seq[crop:])
                batch_meta.append((idx, j, (s - crop, e - crop)))
            if len(batch_seqs) >= self.batch_size:
                flush()
        flush()
        return sum(results) / len(results) if results else 0.0

    def evaluate(self, bundle: str | Path, tasks: Sequence[Task], seeds: Sequence[int] = SEEDS,
                 max_per_task: Optional[int] = None, progress: bool = True) -> dict:
        bundle = Path(bundle)
        baselines = read_baselines(bundle)
        per_seed: dict[int, dict] = {}
        skipped = [t.label for t in tasks if not (bundle / "eval_data" / t.file).is_file()]
        present = [t for t in tasks if t.label not in skipped]
        if not present:
            raise FileNotFoundError(f"{bundle}/eval_data holds none of the {len(tasks)} task files")
        for seed in seeds:
            accuracy, centered = {}, {}
            for task in present:
                started = time.time()
                data = [json.loads(line) for line in open(bundle / "eval_data" / task.file) if line.strip()]
                random.Random(1337).shuffle(data)
                if max_per_task:
                    data = data[:max_per_task]
                acc = self.evaluate_task(task, data, seed)
                base = baselines.get(task.label, 25.0) / 100.0
                accuracy[task.label], centered[task.label] = acc, (acc - base) / (1.0 - base)
                if progress:
                    print(f"[core seed {seed}] {task.label}: accuracy {acc:.4f}, centered {centered[task.label]:.4f} "
                          f"({len(data)} items, {time.time() - started:.1f}s)", flush=True)
            core = [centered[t.label] for t in present if t.core]
            per_seed[seed] = {"accuracy": accuracy, "centered": centered,
                              "core": sum(core) / len(core) if core else None,
                              "core_extended": sum(centered.values()) / len(centered)}

        def stats(values):
            values = [v for v in values if v is not None]
            if not values:
                return None, None
            return statistics.fmean(values), statistics.pstdev(values)

        labels = [t.label for t in present]
        summary = {
            "loops": self.loops, "seeds": list(seeds), "skipped_tasks": skipped,
            "tasks": {label: dict(zip(("centered_mean", "centered_std"), stats([per_seed[s]["centered"][label] for s in seeds])))
                      | {"accuracy_mean": stats([per_seed[s]["accuracy"][label] for s in seeds])[0]} for label in labels},
            "core": dict(zip(("mean", "std"), stats([per_seed[s]["core"] for s in seeds]))),
            "core_extended": dict(zip(("mean", "std"), stats([per_seed[s]["core_extended"] for s in seeds]))),
            "per_seed": per_seed,
        }
        return summary


def core(*, ckpt_path: str, bundle: str, loops: Optional[int] = None, tasks: str = "core",
         seeds: str = ",".join(map(str, SEEDS)), max_per_task: Optional[int] = None, batch_size: int = 32,
         device: str = "cuda" if torch.cuda.is_available() else "cpu", tokenizer: Optional[str] = None,
         out: Optional[Path] = None, overwrite: bool = False) -> None:
    """CORE / Core-Extended at a chosen loop count, from a local eval bundle.

    Args:
        ckpt_path: the checkpoint to evaluate.
        bundle: eval bundle folder (core.yaml, eval_meta_data.csv, eval_data/).
        loops: loop count (default: the model's μ_rec).
        tasks: core | core_extended | path of a bundle-format core.yaml.
        seeds: comma-separated few-shot sampling seeds (mean and std over them).
        max_per_task: at most this many examples per task.
        batch_size: sequences scored together.
        device: cpu, cuda, cuda:1, ...
        tokenizer: tokenizer.json (default: the run's own or its data folder's).
        out: JSON output (default: beside the checkpoint when that folder is writable, else printed only).
        overwrite: replace an existing ``out`` file (otherwise refused before any work).
    """
    args = SimpleNamespace(ckpt_path=ckpt_path, bundle=bundle, loops=loops, tasks=tasks, seeds=str(seeds),
                           max_per_task=max_per_task, batch_size=batch_size, device=device, tokenizer=tokenizer,
                           out=out)
    from parcae.options import check_options
    from parcae.runs import core_result, load_checkpoint, results_dir_for, write_text_atomically
    from parcae.runs.output import check_writable_output

    try:
        check_options(loops=(args.loops, 1), batch_size=(args.batch_size, 1), max_per_task=(args.max_per_task, 1))
        out_dir, note = results_dir_for(args.ckpt_path) if args.out is None else (None, None)
        if args.out is not None:
            check_writable_output(args.out, overwrite, flag="--out")
        run = load_checkpoint(args.ckpt_path, args.device, args.tokenizer)
        model = run.model
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if args.loops is not None and (args.loops < 1 or (not model.config.looped and args.loops != 1)):
            raise ValueError(f"--loops {args.loops}: must be >= 1" + ("" if model.config.looped else
                                                                    f", and {model.config.name} has no loops"))
        loops = args.loops if model.config.looped else None
        scorer = CoreScorer(model, run.tokenizer, loops=loops or model.config.mean_recurrence,
                            batch_size=args.batch_size)
        result = scorer.evaluate(args.bundle, load_tasks(args.tasks), seeds, args.max_per_task)
    except (FileNotFoundError, ValueError) as err:
        raise UsageError(str(err)) from None
    out = args.out or (out_dir / core_result(args.tasks, scorer.loops) if out_dir is not None else None)
    if out is not None:
        write_text_atomically(out, json.dumps(result, indent=2) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.tasks} at T = {scorer.loops} ({len(seeds)} seed(s))")
    for col in ("task", "accuracy", "centered ×100"):
        table.add_column(col)
    for label, r in result["tasks"].items():
        table.add_row(label, f"{r['accuracy_mean']:.4f}", f"{100 * r['centered_mean']:.2f} ± {100 * r['centered_std']:.2f}")
    for key in ("core", "core_extended"):
        if result[key]["mean"] is not None:
            table.add_row(f"[bold]{key}[/bold]", "", f"[bold]{100 * result[key]['mean']:.2f} ± {100 * result[key]['std']:.2f}[/bold]")
    Console().print(table)
    if result["skipped_tasks"]:
        print(f"skipped (file not in the bundle): {', '.join(result['skipped_tasks'])}")
    print(f"written: {out}" if out is not None else f"[parcae] {note}")

