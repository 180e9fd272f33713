"""``parcae scaling-law``: collect a sweep's finished runs (or read a CSV) and fit the training scaling laws
(paper §5.2, Table 11, Eq. 4/7) with ``parcae.analysis.scaling``.

    parcae scaling-law runs.csv                          # columns: flops, mean_recurrence, tokens, loss, N [, loops]
    parcae scaling-law --sweep recipes/sweeps/isoflop_140m.yaml   # collect finished sweep runs, then fit
    parcae scaling-law runs.csv --out checkpoints/scaling_140m
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from parcae.analysis.scaling import analyse, read_runs
from parcae.errors import UsageError


def collect_sweep(sweep: str | Path, runs_dir: str | Path = "checkpoints") -> list[dict]:
    """Rows for every finished run of a sweep: final val loss at T = μ_rec, plus test_loops.json points."""
    from parcae.model import effective_parameters
    from parcae.runs import has_checkpoint
    from parcae.training.run import model_config_of, parse_recipe

    from .miniatures import summarize
    from .sweep import _format, expand

    rows = []
    for run in expand(sweep):
        run_dir = Path(runs_dir) / run.name
        if not has_checkpoint(run_dir) or not run.flops:
            continue
        cfg = parse_recipe(run.recipe, [a for k, v in run.overrides.items() for a in (f"--{k}", _format(v))])
        arch = model_config_of(cfg)
        summary = summarize(run_dir, "ok")
        base = {"flops": run.flops, "mean_recurrence": arch.mean_recurrence, "tokens": summary["tokens"] or run.tokens,
                "N": effective_parameters(arch)}
        if summary["val_loss"] is not None:
            rows.append({**base, "loss": summary["val_loss"], "loops": arch.mean_recurrence})
        for loops, loss in summary.get("test_by_loops", {}).items():
            if int(loops) != arch.mean_recurrence:
                rows.append({**base, "loss": loss, "loops": int(loops)})
    return rows


def scaling_law(table: Optional[str] = None, /, *, sweep: Optional[str] = None, runs_dir: str = "checkpoints",
                out: Optional[Path] = None) -> None:
    """Fit the training scaling laws (isoFLOP optima, power laws, parametric and unified laws) to a table of runs.

    Args:
        table: CSV of runs (flops, mean_recurrence, tokens, loss, N [, loops]).
        sweep: collect finished runs of this sweep file instead of reading a CSV.
        runs_dir: parent folder of the sweep's run directories.
        out: folder for scaling_law.json and plots.
    """
    if bool(table) == bool(sweep):
        raise UsageError("give a CSV table or --sweep, not both")
    try:
        rows = read_runs(table) if table else collect_sweep(sweep, runs_dir)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if not rows:
        raise UsageError("no finished runs to fit")
    out = out or (Path(table).with_suffix("") if table else Path(runs_dir) / Path(sweep).stem)
    result = analyse(rows, out)
    from rich.console import Console

    console = Console()
    for o in result["isoflop_optima"]:
        console.print(f"C = {o['flops']:.3g}: μ* = {o['mu_opt']:.2f}, D* = {o['tokens_opt']:.3g} tokens")
    for key, paper in (("mu_opt_law", 0.40), ("tokens_opt_law", 0.78)):
        if key in result:
            console.print(f"{key}: exponent {result[key]['exponent']:.3f} (paper {paper})")
    for key in ("parametric_law", "unified_law"):
        if key in result:
            params = ", ".join(f"{k} {v:.4g}" for k, v in result[key]["params"].items())
            console.print(f"{key}: {params} (Huber {result[key]['huber']:.2e})")
    console.print(f"written: {out / 'scaling_law.json'}, " + ", ".join(result.get("plots", [])))
