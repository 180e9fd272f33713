"""configs/ pieces stay consistent with the code: model pieces equal the Python presets, every piece parses."""

from pathlib import Path

import pytest
import yaml

from parcae.model import PRESETS, ModelConfig
from parcae.training.optim import OptimizerConfig, ScheduleConfig

ROOT = Path(__file__).parent.parent.parent


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_piece_equals_the_python_preset(name):
    piece = yaml.safe_load((ROOT / "configs" / "model" / f"{name}.yaml").read_text())
    assert ModelConfig(**piece) == PRESETS[name]


def test_every_model_piece_is_a_preset():
    assert {p.stem for p in (ROOT / "configs" / "model").glob("*.yaml")} == set(PRESETS)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "optim").glob("*.yaml")), ids=lambda p: p.stem)
def test_optimizer_pieces_validate(path):
    OptimizerConfig(**yaml.safe_load(path.read_text()))


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "schedule").glob("*.yaml")), ids=lambda p: p.stem)
def test_schedule_pieces_validate(path):
    ScheduleConfig(**yaml.safe_load(path.read_text()))


def test_paper_optimizer_values():
    muon = OptimizerConfig(**yaml.safe_load((ROOT / "configs/optim/muon_adamw_8e-3.yaml").read_text()))
    assert (muon.lr, muon.muon_lr, muon.betas, muon.eps, muon.muon_weight_decay) == (8e-3, 8e-3, (0.8, 0.95), 1e-10, 0.2)
    large = OptimizerConfig(**yaml.safe_load((ROOT / "configs/optim/muon_adamw_6e-3.yaml").read_text()))
    assert (large.lr, large.muon_lr) == (6e-3, 8e-3)
