"""parcae report: the paper's numbers beside ours, read from the files the evaluation commands write."""

import json
import math

import pytest

from parcae.experiments.report import TABLES, collect, markdown, mini_report


def test_paper_tables_are_shipped_as_printed():
    assert TABLES["table5"]["rows"][1] == ["table5_140m_parcae", 8, 19.06, 80.64, 14.04, 9.67]
    assert TABLES["table11"]["rows"][0][1:] == [2.662, 522733.307, 0.771, 25420.102, 0.525]
    assert [r[1:] for r in TABLES["table2"]["rows"]][1] == ["diverged", "converged", "converged"]


def test_ours_come_from_the_run_directories(tmp_path):
    run = tmp_path / "table8_100m_per_batch"
    run.mkdir()
    results = [{"loops": t, "loss": math.log(p)} for t, p in ((1, 250.0), (4, 30.0), (8, 15.0), (16, 13.0))]
    (run / "test_loops.json").write_text(json.dumps({"results": results}))
    cols, rows = collect("table8", tmp_path)
    assert cols == ["run", "T=1", "T=4", "T=8", "T=16"]
    assert rows[0] == ["table8_100m_per_batch", "300.3 / 250", "36.75 / 30", "16.65 / 15", "13.81 / 13"]
    assert rows[1][1] == "70.47 / -"                      # not run yet
    core = tmp_path / "table5_140m_parcae"
    core.mkdir()
    (core / "test_loops.json").write_text(json.dumps({"results": [{"loops": 8, "loss": math.log(19.5)}]}))
    (core / "core_T8.json").write_text(json.dumps({"core": {"mean": 0.141, "std": 0.002}}))
    _, rows = collect("table5", tmp_path)
    assert rows[1][:5] == ["table5_140m_parcae", "8", "19.06 / 19.5", "80.64 / -", "14.04 / 14.1"]
    assert "| run | T | val PPL |" in markdown("t", *collect("table5", tmp_path))


def test_mini_report_relinks_plots(tmp_path):
    suite = tmp_path / "stability"
    suite.mkdir()
    (suite / "report.md").write_text("# Miniature: x\n\n![curves](curves.png)\n")
    assert "![curves](miniatures/stability/curves.png)" in mini_report(tmp_path, "miniatures/")
