"""The report of a test-time loop sweep (``parcae test --loops``): a rich table, ``test_loops.json`` / ``.csv``,
the fitted law L(T) = L∞ + Z·exp(−zT) (paper §5.3, Eq. 6) and a PNG plot of loss against loops.

    parcae test --ckpt_path checkpoints/debug/last.ckpt --loops 1-16     # writes these through this module
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional

from parcae.runs import TEST_LOOPS_CSV, TEST_LOOPS_JSON, TEST_LOOPS_PLOT, write_text_atomically


def write_test_report(rows: list[dict], out_dir: Optional[Path], model_name: str, mean_recurrence: int, looped: bool,
                      global_step: int, split: str = "val", checkpoint: Optional[str] = None) -> list[Path]:
    """Print the table and write the files (none when ``out_dir`` is None: an unwritable folder); returns the
    paths written. A failed fit never loses the results."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = f"{model_name}: loss by loop count on the {split} split (μ_rec = {mean_recurrence}, step {global_step})"
    table = Table(title=title, min_width=min(len(title) + 2, 100))  # as wide as its title: no wrapped title
    for col in ("loops", "loss", "ppl", "bpb", "tokens/s"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["loops"]), f"{r['loss']:.4f}", f"{r['ppl']:.2f}",
                      "-" if r["bpb"] is None else f"{r['bpb']:.4f}",
                      "-" if r["tokens_per_sec"] is None else f"{r['tokens_per_sec']:,.0f}")
    console.print(table)
    if out_dir is None:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"model": model_name, "mean_recurrence": mean_recurrence, "global_step": global_step,
               "split": split, "checkpoint": checkpoint, "results": rows}
    written = [out_dir / TEST_LOOPS_JSON, out_dir / TEST_LOOPS_CSV]
    write_text_atomically(written[0], json.dumps(payload, indent=2) + "\n")
    table_text = io.StringIO(newline="")
    writer = csv.DictWriter(table_text, fieldnames=["loops", "loss", "ppl", "bpb", "tokens_per_sec"])
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomically(written[1], table_text.getvalue())
    fit = None
    if looped and len(rows) >= 3:
        from parcae.analysis.fits import fit_loops_file

        try:
            fitted = fit_loops_file(written[0], plot=False)["fits"].get("exp", {})
        except Exception as err:  # a failed fit must not lose the measured results
            fitted = {}
            console.print(f"[yellow]test-time fit failed ({type(err).__name__}: {err}); results are saved[/yellow]")
        if "params" in fitted:
            fit = fitted
            p = fit["params"]
            console.print(f"test-time fit L(T) = L∞ + Z·exp(−z·T): L∞ = {p['L_inf']:.4f}, Z = {p['Z']:.4g}, "
                          f"z = {p['z']:.4g} (mean Huber {fit['huber']:.2e}; all forms: parcae fit-loops {out_dir})")
    if len(rows) > 1:
        from parcae.analysis.fits import plot_test_time

        written.append(plot_test_time([r["loops"] for r in rows], [r["loss"] for r in rows], fit,
                                      mean_recurrence if looped else None, out_dir / TEST_LOOPS_PLOT,
                                      title=f"{model_name}, step {global_step}", measured=f"{split} loss"))
    console.print("[bold]results[/bold]: " + ", ".join(str(p) for p in written))
    return written

