"""Training scaling laws from a table of runs (paper §5.2, Table 11, Eq. 4/7): isoFLOP optima, power laws,
the parametric law and the unified law, with plots. The command (``parcae scaling-law``) that reads a CSV or
collects a sweep's runs is in ``parcae/experiments/scaling_study.py``.

    from parcae.analysis.scaling import read_runs, analyse
    analyse(read_runs("runs.csv"), out_dir=Path("checkpoints/scaling_140m"))

Rows with ``loops`` different from ``mean_recurrence`` (test-time evaluations) only enter the unified law; the
isoFLOP analysis and Eq. 7 use the rows evaluated at T = μ_rec. ``N`` is the unrolled parameter count N(μ_rec)
(``parcae.model.effective_parameters``); ``--sweep`` fills it in from each run's model.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

import numpy as np

from .fits import fit_parametric_law, isoflop_optima, power_law

COLUMNS = ("flops", "mean_recurrence", "tokens", "loss", "N", "loops")


def read_runs(path: str | Path) -> list[dict]:
    rows = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("flops", "mean_recurrence", "tokens", "loss", "N") if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)} (need {', '.join(COLUMNS[:5])})")
        for line, row in enumerate(reader, 2):
            try:
                rec = {k: float(row[k]) for k in ("flops", "mean_recurrence", "tokens", "loss", "N")}
                rec["loops"] = float(row["loops"]) if row.get("loops") not in (None, "") else rec["mean_recurrence"]
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from None
            rows.append(rec)
    if not rows:
        raise ValueError(f"{path}: no runs")
    return rows


def analyse(rows: list[dict], out_dir: Optional[Path] = None) -> dict:
    at_mu = [r for r in rows if r["loops"] == r["mean_recurrence"]]
    result: dict = {"runs": len(at_mu), "points": len(rows)}
    optima = isoflop_optima(at_mu)
    result["isoflop_optima"] = [{k: v for k, v in o.items() if not k.endswith("_parabola")} for o in optima]
    if len(optima) >= 2:
        C = [o["flops"] for o in optima]
        result["mu_opt_law"] = power_law(C, [o["mu_opt"] for o in optima])        # paper: exponent 0.40
        result["tokens_opt_law"] = power_law(C, [o["tokens_opt"] for o in optima])  # paper: exponent 0.78
    if len(at_mu) >= 6:
        fit = fit_parametric_law([r["N"] for r in at_mu], [r["tokens"] for r in at_mu], [r["loss"] for r in at_mu])
        result["parametric_law"] = fit.to_dict()
    if len(rows) > len(at_mu) and len(rows) >= 8:
        fit = fit_parametric_law([r["N"] for r in rows], [r["tokens"] for r in rows], [r["loss"] for r in rows],
                                 T=[r["loops"] for r in rows], mu=[r["mean_recurrence"] for r in rows])
        result["unified_law"] = fit.to_dict()
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "scaling_law.json").write_text(json.dumps(result, indent=2) + "\n")
        result["plots"] = [str(p) for p in _plot(at_mu, optima, result, out_dir)]
    return result


def _plot(rows: list[dict], optima: list[dict], result: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for o in optima:
        group = sorted((r for r in rows if r["flops"] == o["flops"]), key=lambda r: r["mean_recurrence"])
        mus = [r["mean_recurrence"] for r in group]
        line, = ax.plot(mus, [r["loss"] for r in group], "o", ms=4, label=f"C = {o['flops']:.2g}")
        if "mu_opt_parabola" in o:
            a, b, c = o["mu_opt_parabola"]
            x = np.linspace(np.log(min(mus)), np.log(max(mus)), 100)
            ax.plot(np.exp(x), a * x * x + b * x + c, "-", color=line.get_color(), lw=1)
        ax.plot([o["mu_opt"]], [o["mu_opt_loss"]], "*", color=line.get_color(), ms=10)
    ax.set_xscale("log")
    ax.set_xlabel("μ_rec")
    ax.set_ylabel("validation loss")
    ax.set_title("isoFLOP curves (stars: parabola optima)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out_dir / "isoflop_curves.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    if "mu_opt_law" in result:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        C = np.array([o["flops"] for o in optima])
        for ax, key, law, label in ((axes[0], "mu_opt", result["mu_opt_law"], "μ*_rec"),
                                    (axes[1], "tokens_opt", result["tokens_opt_law"], "D* (tokens)")):
            ax.loglog(C, [o[key] for o in optima], "o")
            grid = np.geomspace(C.min(), C.max(), 50)
            ax.loglog(grid, law["prefactor"] * grid ** law["exponent"], "-",
                      label=f"∝ C^{law['exponent']:.2f}")
            ax.set_xlabel("FLOPs C")
            ax.set_ylabel(label)
            ax.legend()
        fig.tight_layout()
        paths.append(out_dir / "power_laws.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
