"""The demo's last step: loss by test-time loops on the validation plays and on a held-out text, side by side.

    python scripts/demo_curves.py checkpoints/mini_demo carroll_alice_ch1-4

Reads ``test_loops.json`` (from ``parcae test --loops``) and ``perplexity_<text>.json`` (from ``parcae perplexity``)
in the run directory, prints one table in nats per token (both files store what is needed: the validation loss,
and the held-out text's total NLL and predicted tokens), and writes ``demo_loops.png`` with both curves beside it.
The gap column is loss(T = 1) - loss(T): how much the loops buy on each text.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        raise SystemExit("usage: python scripts/demo_curves.py RUN_DIR TEXT_STEM")
    run_dir, stem = Path(argv[0]), argv[1]
    test = json.loads((run_dir / "test_loops.json").read_text())
    held = json.loads((run_dir / f"perplexity_{stem}.json").read_text())
    mu = test["mean_recurrence"]
    val = {r["loops"]: r["loss"] for r in test["results"]}
    # loss per predicted token of the held-out text; loops=None would mean a fixed-depth model
    other = {r["loops"]: r["nll"] / r["tokens"] for r in held["results"]}
    loops = sorted(set(val) | set(other))

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"loss (nats/token) by test-time loops, μ_rec = {mu}")
    for col in ("loops T", "validation plays", "gap to T=1", f"held-out: {stem}", "gap to T=1"):
        table.add_column(col, justify="right")

    def cell(curve, t):
        return f"{curve[t]:.4f}" if t in curve else "-"

    def gap(curve, t):
        return f"{curve[min(curve)] - curve[t]:+.4f}" if t in curve else "-"

    for t in loops:
        table.add_row(str(t), cell(val, t), gap(val, t), cell(other, t), gap(other, t))
    Console().print(table)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, curve, label in ((axes[0], val, "validation plays (Shakespeare)"), (axes[1], other, f"held-out: {stem}")):
        xs = sorted(curve)
        ax.plot(xs, [curve[t] for t in xs], "o-", ms=4)
        ax.axvline(mu, color="grey", ls="--", lw=1, label=f"training μ_rec = {mu}")
        ax.set_xlabel("loops T at test time")
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(label)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out = run_dir / "demo_loops.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"plot: {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
