"""configs/ pieces stay consistent with the code: model pieces equal the Python presets, every piece parses."""

from pathlib import Path

import pytest
import yaml

from parcae.model import PRESETS
from parcae.training.optim import OptimizerConfig, ScheduleConfig

ROOT = Path(__file__).parent.parent.parent


def test_no_copied_model_pieces():
    """Models come from the Python presets by name; configs/ holds no expanded copies of them."""
    assert not (ROOT / "configs" / "model").exists()


def test_recipe_presets_by_name_with_overrides_and_pieces_with_overrides(tmp_path):
    from parcae.training.run import expand_recipe, model_config_of, parse_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model:
  arch: {{preset: parcae-140m, mean_recurrence: 4}}
  optimizer: {ROOT}/configs/optim/adamw_3e-3.yaml
data:
  from: {ROOT}/configs/data/shakespeare.yaml
  batch_size: 3
""")
    expanded = expand_recipe(recipe)
    assert expanded["model"]["arch"] == {**__import__("dataclasses").asdict(PRESETS["parcae-140m"]),
                                         "mean_recurrence": 4}
    assert expanded["data"]["batch_size"] == 3 and expanded["data"]["seq_len"] == 256  # the piece's own value
    cfg = parse_recipe(recipe, ["--model.arch.backprop_depth", "2"])
    arch = model_config_of(cfg)
    assert arch == PRESETS["parcae-140m"].replace(mean_recurrence=4, backprop_depth=2)
    assert cfg.data.batch_size == 3
    # a preset named on the command line replaces the recipe's model
    assert model_config_of(parse_recipe(recipe, ["--model.arch", "gpt-140m"])) == PRESETS["gpt-140m"]


@pytest.mark.parametrize("arch, message", [
    ("parcae-999m", "unknown model preset 'parcae-999m'"),
    ("{preset: parcae-140m, depth: 3}", "preset 'parcae-140m' has no field(s) depth"),
])
def test_bad_presets_are_one_line_errors(tmp_path, arch, message):
    from parcae.errors import UsageError
    from parcae.training.run import parse_recipe

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model:\n  arch: {arch}\n")
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_recipe(recipe)


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
