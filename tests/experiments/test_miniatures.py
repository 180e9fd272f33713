"""The miniature runner end to end on a two-run suite of tiny models: runs, report table, plots, re-reporting."""

import json

import pytest

from conftest import TINY_ARCH, write_recipe
from parcae.experiments.miniatures import run_suite, write_report
from parcae.model import LoopedLM, ModelConfig, flops_per_token


@pytest.mark.slow  # trains a two-run suite
def test_suite_runs_and_reports(tmp_path, small_shards):
    recipe = write_recipe(tmp_path / "tiny.yaml", small_shards, tmp_path / "ignored", max_steps=6)
    suite = tmp_path / "tiny_stability.yaml"
    suite.write_text(f"""title: tiny
claim: a claim
report: stability
recipes: [{recipe.name}]
grid:
  model.optimizer.lr: [1.0e-3, 5.0e-3]
run_name: "tiny_lr{{model.optimizer.lr}}"
test_loops: "1,2"
""")
    report = run_suite(str(suite), tmp_path / "runs")
    text = report.read_text()
    assert "| tiny_lr0.001 | 0.001 | ok |" in text and "| tiny_lr0.005 | 0.005 | ok |" in text
    assert (report.parent / "curves.png").stat().st_size > 1000
    results = json.loads((report.parent / "results.json").read_text())
    first = results["tiny_lr0.001"]
    assert first["max_spectral_radius"] > 0 and first["test_by_loops"].keys() == {"1", "2"}
    assert first["curves"]["train/loss"][0][0] == 0
    again = run_suite(str(suite), tmp_path / "runs", report_only=True)  # reads the finished runs back
    assert again.read_text().splitlines()[4:8] == text.splitlines()[4:8]
    # the same runs as a comparison table: its throughput and val-loss columns come from the event files
    (tmp_path / "cmp").mkdir()
    comparison = write_report("tiny", {"report": "comparison"}, results, tmp_path / "cmp", None).read_text()
    row = next(line for line in comparison.splitlines() if line.startswith("| tiny_lr0.001 |")).split(" | ")
    header = next(line for line in comparison.splitlines() if line.startswith("| run |")).split(" | ")
    assert float(row[header.index("train tok/s")].replace(",", "")) == round(first["tokens_per_sec"])
    assert float(row[header.index("val loss (μ_rec)")]) == round(first["val_loss"], 4)
    # budgets: parameters outside the token and value-embedding tables, and FLOPs = tokens x FLOPs per token
    arch = ModelConfig(**TINY_ARCH)
    non_embedding = sum(p.numel() for name, p in LoopedLM(arch).named_parameters()
                        if not name.startswith(("wte.", "value_embeds.")))
    assert first["non_embedding_params"] == non_embedding
    assert first["tokens"] == 6 * 4 * 32 and first["tokens_per_param"] == first["tokens"] / non_embedding
    assert first["train_flops"] == first["tokens"] * flops_per_token(arch, 32).per_token
    assert row[header.index("tokens/param")] == f"{first['tokens'] / non_embedding:.1f}"
