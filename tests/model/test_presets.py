"""Every paper model preset, built on the meta device, has the exact parameter count of the paper."""

import pytest
import torch

from parcae.model import PAPER_PARAMETER_COUNTS, PRESET_PARAMETER_COUNTS, LoopedLM, preset


def count(config):
    with torch.device("meta"):
        return LoopedLM(config).parameter_counts()


@pytest.mark.parametrize("name", sorted(PAPER_PARAMETER_COUNTS))
def test_preset_parameter_count(name):
    assert count(preset(name))["total"] == PRESET_PARAMETER_COUNTS[name]


@pytest.mark.parametrize("name", ["gpt-140m", "gpt-370m", "gpt-770m", "gpt-1.3b", "parcae-140m", "parcae-370m",
                                  "parcae-770m", "parcae-1.3b", "rdm-100m", "rdm-350m"])
def test_tables_18_19_and_rdm_match_the_paper_exactly(name):
    assert PRESET_PARAMETER_COUNTS[name] == PAPER_PARAMETER_COUNTS[name]


@pytest.mark.parametrize("size", ["140m", "370m", "770m", "1.3b"])
def test_parcae_adds_3d_plus_2d_squared_over_the_matched_gpt(size):
    # Paper Table 19 "Additional": A_log + dt_bias + prelude norm (3d) and B, C (2d²).
    d = preset(f"parcae-{size}").d_model
    assert count(preset(f"parcae-{size}"))["total"] - count(preset(f"gpt-{size}"))["total"] == 3 * d + 2 * d * d


def test_table_17_parcae_readings_are_documented_exactly():
    # The table's Parcae-350M equals the reading without readout C and prelude norm ...
    assert count(preset("parcae-350m", readout=False, prelude_norm=False))["total"] == PAPER_PARAMETER_COUNTS["parcae-350m"]
    # ... which does not give the table's Parcae-100M; that cell equals RDM-100M's count digit for digit.
    assert count(preset("parcae-100m", readout=False, prelude_norm=False))["total"] == 113_189_888
    assert PAPER_PARAMETER_COUNTS["parcae-100m"] == PAPER_PARAMETER_COUNTS["rdm-100m"]
    assert PAPER_PARAMETER_COUNTS["parcae-100m"] - PRESET_PARAMETER_COUNTS["parcae-100m"] == 3 * 1024


def test_presets_follow_the_paper_hyperparameters():
    for size, (d, stage) in {"140m": (768, 2), "370m": (1024, 4), "770m": (1280, 6), "1.3b": (1536, 8)}.items():
        cfg = preset(f"parcae-{size}")
        assert (cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.n_prelude, cfg.n_recurrent, cfg.n_coda) == \
            (d, 4 * d, 128, stage, stage, stage)
        assert (cfg.injection, cfg.mean_recurrence, cfg.backprop_depth, cfg.depth_granularity) == \
            ("diagonal", 8, 4, "per_sequence")
        assert preset(f"gpt-{size}").effective_depth() == 3 * stage
    assert (preset("rdm-100m").mean_recurrence, preset("rdm-100m").backprop_depth) == (16, 8)
    assert (preset("parcae-350m").mean_recurrence, preset("parcae-350m").backprop_depth) == (8, 4)
    # Value-embedding share: 140M holds 3 tables of 32768x768 (paper §1.5).
    assert count(preset("parcae-140m"))["value_embeddings"] == 3 * 32768 * 768


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="parcae-140m"):
        preset("parcae-9000m")
