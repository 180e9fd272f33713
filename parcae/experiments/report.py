"""Paper-format reports: each of the paper's tables beside our results, as a rich table and markdown.

    parcae report table5                     # reads checkpoints/table5_*/ (test_loops, core_T8, lm_eval_T8 ...)
    parcae report table2 --runs_dir /scratch/runs --out docs/table2.md
    parcae report mini                       # the CPU miniature suites (checkpoints/mini/*/results.json)
    parcae report --list

Cells read "paper / ours"; "-" where a run or an evaluation has not been done. Our numbers come from the files the
other commands write into each run directory: TensorBoard events (val/loss), ``test_loops.json`` (parcae test),
``core_T{n}.json`` / ``core_extended_T{n}.json`` (parcae core), ``lm_eval_T{n}.json`` (parcae lm-eval),
``perplexity_*.json`` (parcae perplexity), ``test_loops_fit.json`` (parcae fit-loops) and sweep outputs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from parcae.errors import UsageError
from parcae.runs import TEST_LOOPS_FIT, TEST_LOOPS_JSON, core_result, lm_eval_result

TABLES = yaml.safe_load(Path(__file__).with_name("paper_tables.yaml").read_text())


def _json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.is_file() else None


def _test_loss(run_dir: Path, loops: int) -> Optional[float]:
    data = _json(run_dir / TEST_LOOPS_JSON)
    if data:
        for r in data["results"]:
            if r["loops"] == loops:
                return r["loss"]
    return None


def _val_loss(run_dir: Path) -> Optional[float]:
    if not run_dir.exists():
        return None
    from .miniatures import summarize

    return summarize(run_dir, "").get("val_loss")


def _ppl(loss: Optional[float]) -> Optional[float]:
    return math.exp(loss) if loss is not None else None


def _core(run_dir: Path, loops: int, key: str = "core", which: str = "core") -> Optional[float]:
    for name in (core_result(which, loops), core_result("core_extended", loops)):
        data = _json(run_dir / name)
        if data and data.get(key, {}).get("mean") is not None:
            return 100 * data[key]["mean"]
    return None


def _lm_eval(run_dir: Path, loops: int, task: str, metric: str) -> Optional[float]:
    data = _json(run_dir / lm_eval_result(loops))
    if data and task in data:
        value = data[task].get(metric)
        return float(value) if value is not None else None
    return None


KEY = object()  # marks the identifying columns of a row (run name, T, LR): shown as the paper prints them


def _word_ppl(run_dir: Path, loops: int) -> Optional[float]:
    """WikiText word perplexity from `parcae perplexity --text <wiki...>` output in the run directory."""
    for path in sorted(run_dir.glob("perplexity_wiki*.json")):
        for r in json.loads(path.read_text())["results"]:
            if r["loops"] == loops:
                return r["word_perplexity"]
    return None


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.4e}"
    return str(value)


def _status(run_dir: Path) -> Optional[str]:
    """converged / diverged for a finished run (a stopped run, or a final loss above its start, diverged)."""
    if not run_dir.exists():
        return None
    from .miniatures import summarize

    status_file = run_dir / "status.txt"
    if status_file.exists() and status_file.read_text().startswith("stopped"):
        return "diverged"
    s = summarize(run_dir, "ok")
    curve = [v for _, v in s["curves"].get("train/loss", [])]
    if not curve:
        return None
    return "diverged" if (not math.isfinite(curve[-1]) or curve[-1] > curve[0]) else "converged"


def collect(table: str, runs: Path) -> tuple[list[str], list[list[str]]]:
    """Column names and rows of "paper / ours" cells for one table."""
    spec = TABLES[table]
    cols, rows = spec["columns"], []
    ours: Callable[[list], list]
    if table == "table2":
        models = ["table2_350m_rdm_prenorm", "table2_350m_rdm_resnorm", "table2_350m"]

        def ours(row):
            lr = f"{row[0]:g}"
            return [KEY] + [_status(runs / f"{m}_lr{lr}") for m in models]
    elif table == "table3":
        def ours(row):
            d, t = runs / row[0], row[1]
            accs = [_lm_eval(d, t, task, "acc_norm,none" if task in ("hellaswag", "arc_challenge", "arc_easy", "piqa")
                             else "acc,none") for task in ("hellaswag", "arc_challenge", "arc_easy", "piqa", "boolq", "sciq")]
            accs = [100 * a if a is not None else None for a in accs]
            avg = sum(accs) / len(accs) if all(a is not None for a in accs) else None
            return [KEY, KEY, _ppl(_test_loss(d, t)), _word_ppl(d, t), *accs, avg]
    elif table == "table4":
        def ours(row):
            d = runs / row[0]
            return [KEY] + [_test_loss(d, t) for t in (1, 4, 8)] + [_core(d, t) for t in (1, 4, 8)]
    elif table == "table5":
        def ours(row):
            d, t = runs / row[0], (8 if row[1] != "-" else 1)
            return [KEY, KEY, _ppl(_test_loss(d, t) or _val_loss(d)),
                    _lm_eval(d, t, "lambada_openai", "perplexity,none"), _core(d, t),
                    _core(d, t, "core_extended", "core_extended")]
    elif table == "table8":
        def ours(row):
            return [KEY] + [_ppl(_test_loss(runs / row[0], t)) for t in (1, 4, 8, 16)]
    elif table in ("table9", "table10"):
        def ours(row):
            name = f"table9_100m_rdm_mu{row[0]}" if table == "table9" else f"table10_100m_rdm_bwd{row[0]}"
            return [KEY, _test_loss(runs / name, row[0] if table == "table9" else 20) or _val_loss(runs / name)]
    elif table == "table11":
        def ours(row):
            data = _json(runs / f"isoflop_{row[0].lower()}" / "scaling_law.json")
            params = (data or {}).get("parametric_law", {}).get("params", {})
            return [KEY] + [params.get(k) for k in ("E", "A", "a", "B", "b")]
    elif table == "table12":
        def ours(row):
            size = "140m" if "140M" in row[0] else "370m"
            key = "huber" if row[0].startswith("in-") else "extrapolation_huber"
            fits = [_json(p) for p in sorted(runs.glob(f"tts_isoflop_{size}_mu*/{TEST_LOOPS_FIT}"))]
            values = []
            for form in ("exp", "shifted_power", "power", "pure_power"):
                xs = [f["fits"][form][key] for f in fits if f and key in f["fits"].get(form, {})]
                values.append(1e7 * sum(xs) / len(xs) if xs else None)
            return [KEY, *values]
    else:
        raise ValueError(f"no collector for {table}")
    for row in spec["rows"]:
        rows.append([_fmt(paper) if our is KEY else f"{_fmt(paper)} / {_fmt(our)}" for paper, our in zip(row, ours(row))])
    return cols, rows


def mini_report(runs: Path, image_prefix: str = "") -> str:
    """The finished miniature suites' reports, one after another; image links get ``image_prefix<suite>/``."""
    parts = []
    for suite_dir in sorted(p for p in runs.glob("*") if (p / "report.md").exists()):
        text = (suite_dir / "report.md").read_text()
        parts.append(re.sub(r"\]\(([^)/]+\.png)\)", rf"]({image_prefix}{suite_dir.name}/\1)", text))
    return "\n\n".join(parts) if parts else "No miniature suite has finished yet (`parcae mini <suite>`)."


def markdown(title: str, cols: list[str], rows: list[list[str]]) -> str:
    lines = [f"### {title}", "", "Cells: paper / ours.", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def report(table: Optional[str] = None, /, *, runs_dir: Optional[Path] = None, out: Optional[Path] = None,
           list: bool = False, image_prefix: str = "") -> None:  # noqa: A002 (the flag is --list)
    """The paper's tables beside our results.

    Args:
        table: a table of the paper (see --list) or mini (the CPU miniature suites).
        runs_dir: default: checkpoints (mini: checkpoints/mini).
        out: also write markdown here.
        list: list the tables.
        image_prefix: mini: prefix for the plots' links (e.g. miniatures/).
    """
    if list or not table:
        for key, spec in TABLES.items():
            print(f"{key:8s} {spec['title']}")
        print("mini     the CPU miniature suites")
        return
    if table == "mini":
        text = mini_report(runs_dir or Path("checkpoints/mini"), image_prefix)
        print(text)
    elif table in TABLES:
        cols, rows = collect(table, runs_dir or Path("checkpoints"))
        from rich.console import Console
        from rich.table import Table

        grid = Table(title=TABLES[table]["title"] + "  (paper / ours)")
        for col in cols:
            grid.add_column(str(col))
        for row in rows:
            grid.add_row(*row)
        Console().print(grid)
        text = markdown(TABLES[table]["title"], cols, rows)
    else:
        raise UsageError(f"unknown table {table!r}; see parcae report --list")
    if out:
        out.write_text(text)
        print(f"written: {out}")
