"""parcae scaling-law on a table of synthetic runs with known isoFLOP optima and parametric law."""

import csv
import json
import math

import pytest

from parcae.cli import main
from parcae.model import effective_parameters, preset


def test_effective_parameters_count_the_loop():
    cfg = preset("parcae-140m")
    one, eight = effective_parameters(cfg, 1), effective_parameters(cfg, 8)
    core = 2 * (4 * 768**2 + 2 * 768 * 3072 + 2 * 768) + 192 + (2 * 768 + 768**2)  # 2 blocks (+1 gate), A, Δ, B
    assert eight - one == pytest.approx(7 * core)
    assert effective_parameters(preset("gpt-140m")) == 143_141_184 - 3 * 32768 * 768  # value tables excluded


def test_scaling_law_command_on_a_csv(tmp_path, capsys):
    table = tmp_path / "runs.csv"
    E, A, a, B, b = 2.662, 522733.307, 0.771, 25420.102, 0.525
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["flops", "mean_recurrence", "tokens", "loss", "N", "loops"])
        for C in (1e18, 4e18, 1.6e19):
            mu_star, d_star = 0.9 * (C / 1e18) ** 0.4, 1.1e9 * (C / 1e18) ** 0.78
            for mu in (1, 2, 4, 8, 12):
                x = math.log(mu / mu_star)
                N, D = 5.4e7 + mu * 1.47e7, d_star * math.exp(-1.3 * x)
                loss = E + A * N ** -a + B * D ** -b
                writer.writerow([C, mu, D, loss, N, mu])
    main(["scaling-law", str(table), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "isoflop" not in out.lower() or "μ*" in out
    result = json.loads((tmp_path / "out" / "scaling_law.json").read_text())
    assert len(result["isoflop_optima"]) == 3 and result["runs"] == 15
    assert result["parametric_law"]["params"]["E"] == pytest.approx(E, rel=5e-3)
    assert (tmp_path / "out" / "isoflop_curves.png").stat().st_size > 1000
    assert (tmp_path / "out" / "power_laws.png").exists()


def test_scaling_law_rejects_incomplete_tables(tmp_path):
    table = tmp_path / "bad.csv"
    table.write_text("flops,loss\n1e18,3.0\n")
    with pytest.raises(SystemExit, match="missing column"):
        main(["scaling-law", str(table)])
