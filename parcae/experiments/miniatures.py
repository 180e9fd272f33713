"""CPU miniatures of the paper's claims: run a suite end to end and report it (markdown + rich table + PNG plots).

    parcae mini stability        # Table 2 in miniature: pre-norm RDM vs residual-norm RDM vs Parcae at rising LR
    parcae mini comparison       # Tables 3/5 in miniature: GPT vs RDM vs Parcae, equal parameters and tokens
    parcae mini sampling         # Table 8 in miniature: per-batch vs per-sequence depth sampling
    parcae mini test_time        # Fig. 7 in miniature: loss vs test-time loops for several μ_rec
    parcae mini <suite> --report_only     # re-read finished runs and rewrite the report

A suite is a sweep file (``recipes/mini/suites/<suite>.yaml``, format in ``parcae/experiments/sweep.py``) plus ``title``,
``claim`` and ``report`` (which table and plots to make). Runs go to ``checkpoints/mini/<suite>/<run>/``; the
report to ``checkpoints/mini/<suite>/report.md`` with its PNGs. Re-running resumes or skips finished runs.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from parcae.errors import UsageError
from parcae.runs import CONFIG_FILE, TEST_LOOPS_JSON


def _scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} from every event file of a run (a resumed run's later values win)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    for events in sorted(run_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        ea = EventAccumulator(str(events), size_guidance={"scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in ea.Scalars(tag)})
    return out


def summarize(run_dir: Path, status: str) -> dict[str, Any]:
    """Final and extreme values of the tags the reports use."""
    s = _scalars(run_dir) if run_dir.exists() else {}

    def last(tag):
        values = s.get(tag)
        return values[max(values)] if values else None

    def extreme(tag):
        values = [v for v in s.get(tag, {}).values() if math.isfinite(v)]
        return max(values) if values else None

    summary = {"status": status, "train_loss": last("train/loss"), "val_loss": last("val/loss"),
               "val_bpb": last("val/bpb"), "max_spectral_radius": extreme("loop/spectral_radius"),
               "max_state_norm": extreme("loop/state_norm"), "final_state_norm": last("loop/state_norm"),
               "tokens": last("tokens_seen"), "tokens_per_sec": last("perf/tokens_per_sec"),
               "val_by_loops": {int(t.split("_T")[1]): last(t) for t in s if t.startswith("val/loss_T")},
               "curves": {tag: sorted(s[tag].items()) for tag in ("train/loss", "loop/spectral_radius",
                                                                  "loop/state_norm", "val/loss") if tag in s}}
    summary.update(_size(run_dir, summary["tokens"]))
    test = run_dir / TEST_LOOPS_JSON
    if test.exists():
        summary["test_by_loops"] = {r["loops"]: r["loss"] for r in json.loads(test.read_text())["results"]}
    return summary


def _size(run_dir: Path, tokens: Optional[float]) -> dict[str, Any]:
    """Non-embedding parameters, training FLOPs per token (the paper's App. D counting, ``parcae.model.flops``,
    at the run's μ_rec / μ_bwd and sequence length) and what they come to over the tokens seen."""
    config_file = run_dir / CONFIG_FILE
    if not config_file.exists():
        return {}
    from parcae.model import ModelConfig, flops_per_token
    from parcae.model.looped import LoopedLM

    import torch

    cfg = yaml.safe_load(config_file.read_text())
    arch = ModelConfig(**cfg["model"]["arch"])
    with torch.device("meta"):
        counts = LoopedLM(arch).parameter_counts()
    params = counts["total"] - counts["embeddings"] - counts["value_embeddings"]  # lookup tables are not compute
    per_token = flops_per_token(arch, cfg["data"]["seq_len"]).per_token
    return {"non_embedding_params": params, "train_flops_per_token": per_token,
            "tokens_per_param": tokens / params if tokens else None,
            "train_flops": per_token * tokens if tokens else None}


def run_suite(name: str, runs_dir: Path, report_only: bool = False) -> Path:
    from .sweep import expand

    from parcae.resources import suites_dir

    suite_file = Path(name) if name.endswith(".yaml") else suites_dir() / f"{name}.yaml"
    name = suite_file.stem
    if not suite_file.exists():
        known = ", ".join(sorted(p.stem for p in suites_dir().glob("*.yaml")))
        raise UsageError(f"unknown suite {name!r} (known: {known})")
    spec = yaml.safe_load(suite_file.read_text())
    runs = expand(suite_file)
    out_dir = runs_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    started = time.time()
    for i, run in enumerate(runs, 1):
        run_dir = out_dir / run.name
        status = "ok"
        if not report_only:
            print(f"[mini {name}] ({i}/{len(runs)}) {run.name}", flush=True)
            fit = [sys.executable, "-m", "parcae", *run.fit_args(), "--runs_dir", str(out_dir)]
            result = subprocess.run(fit, capture_output=True, text=True)
            if result.returncode != 0:
                tail = (result.stdout + result.stderr).strip().splitlines()[-1:] or ["?"]
                status = "stopped: " + tail[0].replace("parcae: error: ", "")[:160]
                print(f"[mini {name}]   {status}", flush=True)
            elif run.test_args():
                test = [sys.executable, "-m", "parcae", *run.test_args(str(out_dir))]
                subprocess.run(test, capture_output=True, text=True, check=True)
            (run_dir / "status.txt").parent.mkdir(parents=True, exist_ok=True)
            (run_dir / "status.txt").write_text(status + "\n")
        elif (run_dir / "status.txt").exists():
            status = (run_dir / "status.txt").read_text().strip()
        results[run.name] = {**summarize(run_dir, status), "overrides": run.overrides, "recipe": run.recipe.stem}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    report = write_report(name, spec, results, out_dir, time.time() - started if not report_only else None)
    print(f"[mini {name}] report: {report}", flush=True)
    return report


def _fmt(value, spec="{:.3f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and (abs(value) >= 1e4 or (0 < abs(value) < 1e-3)):
        return f"{value:.2e}"
    return spec.format(value)


def write_report(name: str, spec: dict, results: dict, out_dir: Path, seconds: Optional[float]) -> Path:
    kind = spec.get("report", "comparison")
    lines = [f"# Miniature: {spec.get('title', name)}", "", spec.get("claim", "").strip(), ""]
    if kind == "stability":
        header = ["run", "LR", "status", "final train loss", "final val loss", "max ρ(Ā)", "max ‖h_T‖"]
        rows = [[n, _fmt(r["overrides"].get("model.optimizer.lr"), "{:g}"), r["status"], _fmt(r["train_loss"]),
                 _fmt(r["val_loss"]), _fmt(r["max_spectral_radius"]), _fmt(r["max_state_norm"], "{:.1f}")]
                for n, r in results.items()]
    elif kind in ("comparison", "sampling"):
        # val loss at μ_rec (every model, GPTs included), then at each validated loop count of the looped ones
        loops = sorted({t for r in results.values() for t in r["val_by_loops"]})
        # train tokens/s: equal tokens is not equal compute, a looped model pays for its recurrence
        # non-embedding parameters, tokens per parameter and training FLOPs: which budget the comparison holds equal
        header = ["run", "status", "tokens", "params (non-emb)", "tokens/param", "train FLOPs", "train tok/s",
                  "final train loss", "val loss (μ_rec)", "val bpb"] + [f"val loss T={t}" for t in loops]
        rows = [[n, r["status"], _fmt(r["tokens"], "{:,.0f}"), _fmt(r.get("non_embedding_params"), "{:,}"),
                 _fmt(r.get("tokens_per_param"), "{:.1f}"), _fmt(r.get("train_flops"), "{:.3g}"),
                 _fmt(r["tokens_per_sec"], "{:,.0f}"), _fmt(r["train_loss"]), _fmt(r["val_loss"], "{:.4f}"),
                 _fmt(r["val_bpb"], "{:.4f}")]
                + [_fmt(r["val_by_loops"].get(t)) for t in loops] for n, r in results.items()]
    else:  # test_time
        loops = sorted({t for r in results.values() for t in r.get("test_by_loops", {})})
        header = ["run", "μ_rec"] + [f"T={t}" for t in loops]
        rows = [[n, str(r["overrides"].get("model.arch.mean_recurrence", "-"))]
                + [_fmt(r.get("test_by_loops", {}).get(t)) for t in loops] for n, r in results.items()]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    plots = _plots(kind, results, out_dir)
    lines += [""] + [f"![{p.stem}]({p.name})" for p in plots]
    if seconds is not None:
        # runs finished by an earlier invocation are skipped here, so this is not the suite's full cost
        lines += ["", f"Wall time of this invocation: {seconds / 60:.1f} min."]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    from rich.console import Console
    from rich.table import Table

    table = Table(title=spec.get("title", name))
    for col in header:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    Console().print(table)
    return report


def _plots(kind: str, results: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    if kind == "test_time":
        fig, ax = plt.subplots(figsize=(6, 4))
        for n, r in results.items():
            curve = sorted(r.get("test_by_loops", {}).items())
            if curve:
                mu = r["overrides"].get("model.arch.mean_recurrence")
                line, = ax.plot([t for t, _ in curve], [v for _, v in curve], "o-", ms=3, label=f"μ_rec = {mu}")
                if mu:
                    ax.axvline(mu, color=line.get_color(), ls=":", lw=1)
        ax.set_xlabel("loops T at test time")
        ax.set_ylabel("validation loss")
        ax.legend()
        ax.set_title("loss vs test-time loops (dotted: training μ_rec)")
        paths.append(out_dir / "loss_vs_loops.png")
    else:
        panels = [("train/loss", "training loss", False)]
        if kind == "comparison":  # validation beside training shows over-fitting
            panels += [("val/loss", "validation loss (μ_rec)", False)]
        if kind == "stability":
            panels += [("loop/spectral_radius", "ρ(Ā)", False), ("loop/state_norm", "‖h_T‖", True)]
        fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
        for ax, (tag, label, log) in zip(axes[0], panels):
            for n, r in results.items():
                curve = r["curves"].get(tag, [])
                if curve:
                    ax.plot([s for s, _ in curve], [v for _, v in curve], label=n, lw=1)
            if tag == "loop/spectral_radius":
                ax.axhline(1.0, color="k", ls="--", lw=0.8)
            ax.set_xlabel("step")
            ax.set_ylabel(label)
            if log:
                ax.set_yscale("log")
        axes[0][0].legend(fontsize=7)
        paths.append(out_dir / "curves.png")
    fig.tight_layout()
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def mini(suite: str, /, *, runs_dir: Path = Path("checkpoints/mini"), report_only: bool = False) -> None:
    """Run a CPU miniature suite and write its report.

    Args:
        suite: stability | comparison | sampling | test_time | ... (recipes/mini/suites/), or the path of a suite
            file.
        runs_dir: parent folder of the suite's run directories.
        report_only: only re-read finished runs and rewrite the report.
    """
    run_suite(suite, runs_dir, report_only)
