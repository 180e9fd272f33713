"""Every recipe parses against the current CLI and reproduces the paper's settings (litgpt's config-hub test).

Each paper recipe's model is built on the meta device; parameter count, μ_rec/μ_bwd, batch x sequence,
tokens -> steps, learning rates and schedule are checked against the paper (paper Tables 17-21, App. Q).
"""

import math
from pathlib import Path

import pytest
import torch

from parcae.cli import main
from parcae.training.run import model_config_of, parse_recipe
from parcae.model import PRESET_PARAMETER_COUNTS, LoopedLM, flops_per_token
from parcae.experiments.sweep import expand

ROOT = Path(__file__).parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
MINI = sorted((ROOT / "recipes" / "mini").glob("*.yaml"))
SWEEPS = sorted((ROOT / "recipes" / "sweeps").glob("*.yaml"))

# name: (preset, (μ_rec, μ_bwd) or None, global batch, seq, tokens, paper steps or None, (lr, muon lr), schedule)
HUGINN_100M = ((4e-4, None), "warmup_cooldown")
HUGINN_350M = ((2e-4, None), "warmup_cooldown")
PAPER = {
    "table5_140m_gpt": ("gpt-140m", None, 256, 2048, 11.2e9, 21_400, (8e-3, 8e-3), "trapezoid"),
    "table5_140m_parcae": ("parcae-140m", (8, 4), 256, 2048, 11.2e9, 21_400, (8e-3, 8e-3), "trapezoid"),
    "table5_370m_gpt": ("gpt-370m", None, 256, 2048, 29.6e9, 56_500, (8e-3, 8e-3), "trapezoid"),
    "table5_370m_parcae": ("parcae-370m", (8, 4), 256, 2048, 29.6e9, 56_500, (8e-3, 8e-3), "trapezoid"),
    "table5_770m_gpt": ("gpt-770m", None, 256, 2048, 61.6e9, 117_500, (6e-3, 8e-3), "trapezoid"),
    "table5_770m_parcae": ("parcae-770m", (8, 4), 256, 2048, 61.6e9, 117_500, (6e-3, 8e-3), "trapezoid"),
    "table5_1.3b_gpt": ("gpt-1.3b", None, 256, 2048, 104e9, 198_400, (6e-3, 8e-3), "trapezoid"),
    "table5_1.3b_parcae": ("parcae-1.3b", (8, 4), 256, 2048, 104e9, 198_400, (6e-3, 8e-3), "trapezoid"),
    "table4_140m_rdm": ("ladder-140m-rdm", (8, 4), 256, 2048, 11.2e9, 21_400, (8e-3, 8e-3), "trapezoid"),
    "table4_140m_constrained": ("ladder-140m-constrained", (8, 4), 256, 2048, 11.2e9, 21_400, (8e-3, 8e-3), "trapezoid"),
    "table4_140m_per_sequence": ("ladder-140m-per-sequence", (8, 4), 256, 2048, 11.2e9, 21_400, (8e-3, 8e-3), "trapezoid"),
    "table4_140m_parcae": ("parcae-140m", (8, 4), 256, 2048, 11.2e9, 21_400, (8e-3, 8e-3), "trapezoid"),
    "table3_100m_rdm": ("rdm-100m", (16, 8), 128, 2048, 10e9, None, *HUGINN_100M),
    "table3_100m_parcae": ("parcae-100m", (16, 8), 128, 2048, 10e9, None, *HUGINN_100M),
    "table3_350m_rdm": ("rdm-350m", (8, 4), 128, 2048, 10e9, None, *HUGINN_350M),
    "table3_350m_parcae": ("parcae-350m", (8, 4), 128, 2048, 10e9, None, *HUGINN_350M),
    "table8_100m_per_batch": ("parcae-100m-per-batch", (16, 8), 128, 2048, 10e9, None, *HUGINN_100M),
    "table8_350m_per_batch": ("parcae-350m-per-batch", (8, 4), 128, 2048, 10e9, None, *HUGINN_350M),
    "table2_350m": ("parcae-350m", (8, 4), 128, 2048, 3.8e9, None, *HUGINN_350M),
    "table2_350m_rdm_prenorm": ("rdm-350m-prenorm", (8, 4), 128, 2048, 3.8e9, None, *HUGINN_350M),
    "table2_350m_rdm_resnorm": ("rdm-350m", (8, 4), 128, 2048, 3.8e9, None, *HUGINN_350M),
    "table9_100m_rdm": ("rdm-100m-huginn-sampler", (16, 4), 128, 2048, 10e9, None, *HUGINN_100M),
    "isoflop_140m": ("parcae-140m", (8, 4), 256, 2048, 11.2e9, 21_400, (8e-3, 8e-3), "trapezoid"),
    "isoflop_370m": ("parcae-370m", (8, 4), 256, 2048, 11.2e9, None, (8e-3, 8e-3), "trapezoid"),
}


def test_every_paper_recipe_has_expectations():
    assert {p.stem for p in RECIPES} == set(PAPER)


@pytest.mark.parametrize("path", RECIPES + MINI, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipe_parses_and_documents_itself(path):
    cfg = parse_recipe(path)
    assert isinstance(cfg.seed_everything, int) and not isinstance(cfg.seed_everything, bool)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")]
    text = "\n".join(header)
    assert "Run:" in text or "parcae fit" in text, "the recipe comment must say how to run it"
    if path.parent.name == "recipes":
        assert "Expected" in text and ("Data:" in text or "data" in text.lower()) and "Multi-node" in text


@pytest.mark.parametrize("name", sorted(PAPER))
def test_recipe_matches_the_paper(name):
    preset, depth, batch, seq, tokens, paper_steps, (lr, muon_lr), schedule = PAPER[name]
    cfg = parse_recipe(ROOT / "recipes" / f"{name}.yaml")
    arch = model_config_of(cfg)
    with torch.device("meta"):
        params = LoopedLM(arch).parameter_counts()["total"]
    assert arch.name == preset
    if preset in PRESET_PARAMETER_COUNTS:
        assert params == PRESET_PARAMETER_COUNTS[preset]
    if depth is None:
        assert not arch.looped
    else:
        assert (arch.mean_recurrence, arch.backprop_depth) == depth
    assert cfg.global_batch_size == batch and cfg.data.seq_len == seq
    assert cfg.max_tokens == tokens
    steps = cfg.trainer.max_steps
    assert steps == math.ceil(tokens / (batch * seq))
    if paper_steps:
        assert abs(steps - paper_steps) / paper_steps < 0.005, (steps, paper_steps)
    optimizer = cfg.model.optimizer
    assert optimizer.lr == lr
    if muon_lr is not None:
        assert optimizer.name == "muon_adamw" and optimizer.muon_lr == muon_lr
        assert tuple(optimizer.betas) == (0.8, 0.95) and optimizer.eps == 1e-10
    else:
        assert optimizer.name == "adamw" and tuple(optimizer.betas) == (0.9, 0.95)
    assert cfg.model.schedule.name == schedule
    if schedule == "trapezoid":
        assert (cfg.model.schedule.warmup_steps, cfg.model.schedule.cooldown_fraction) == (0, 0.5)
    else:
        assert (cfg.model.schedule.warmup_steps, cfg.model.schedule.cooldown_steps) == (4096, 4096)
        assert steps > 8192  # room for the warm-up and the cool-down
    assert cfg.trainer.precision == "bf16-mixed" and cfg.trainer.gradient_clip_val == 1.0


def test_paper_recipes_fail_fast_without_their_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no data/ here
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(ROOT / "recipes" / "table5_140m_parcae.yaml")])
    message = str(info.value)
    assert "data/fineweb-edu does not exist" in message and "docs/data.md" in message and "\n" not in message


@pytest.mark.slow
def test_table2_recipe_runs_as_written_on_a_stand_in_data_folder(tmp_path):
    """The unchanged 350M recipe for one real step on CPU, over a stand-in folder with a 65,536-token vocabulary."""
    from conftest import synthetic_documents, write_jsonl
    from data_prep.shards import prepare_shards
    from data_prep.tokenizer import train_tokenizer

    tok = train_tokenizer(synthetic_documents(200), vocab_size=400, show_progress=False)
    tok.add_tokens([f"<|unused{i}|>" for i in range(65536 - tok.get_vocab_size())])
    tok.save(str(tmp_path / "tok.json"))
    src = write_jsonl(tmp_path / "docs.jsonl", synthetic_documents(120))
    prepare_shards([src], tmp_path / "huginn", tmp_path / "tok.json", val_fraction=0.2, chunk_tokens=2048, quiet=True)
    main(["fit", "--config", str(ROOT / "recipes" / "table2_350m.yaml"), "--data.datasets", f"[{tmp_path / 'huginn'}]",
          "--trainer", str(ROOT / "configs" / "trainer" / "cpu.yaml"), "--trainer.max_steps", "1",
          "--data.batch_size", "1", "--data.seq_len", "32", "--data.num_workers", "0", "--global_batch_size", "1",
          "--runs_dir", str(tmp_path / "runs")])
    ckpt = torch.load(tmp_path / "runs" / "table2_350m" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 1 and ckpt["hyper_parameters"]["arch"]["d_model"] == 2048


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweeps_expand(path):
    runs = expand(path)
    expected = {"table2_lr": 15, "table9_mean_recurrence": 6, "table10_backprop_depth": 5, "isoflop_140m": 42,
                "isoflop_370m": 21, "test_time_scaling": 12}[path.stem]
    assert len(runs) == expected
    for run in runs:
        mu = run.overrides.get("model.arch.mean_recurrence")
        if "isoflop" in path.stem or "test_time" in path.stem:
            assert run.overrides["model.arch.backprop_depth"] == math.ceil(mu / 2)  # paper Eq. 6


def test_isoflop_tokens_come_from_the_flop_budget():
    runs = {r.name: r for r in expand(ROOT / "recipes" / "sweeps" / "isoflop_140m.yaml")}
    # μ_rec = 1 is a fixed-depth Parcae: official counting gives 6 (N - wte) + attention, by hand:
    n = 144_323_136 - 32768 * 768
    per_token = 6 * n + 4 * 768 * 2048 * (3 * 4 + 2 + 2 * 2)
    assert runs["isoflop_140m_mu1_C1e18"].tokens == int(1e18 / per_token)
    # more loops cost more per token, so a fixed budget buys fewer tokens
    tokens = [runs[f"isoflop_140m_mu{m}_C1.6e19"].tokens for m in (1, 2, 4, 6, 8, 10, 12)]
    assert tokens == sorted(tokens, reverse=True)
    r = runs["isoflop_140m_mu8_C1.6e19"]
    cfg = parse_recipe(r.recipe, ["--model.arch.mean_recurrence", "8", "--model.arch.backprop_depth", "4"])
    assert r.tokens == int(1.6e19 / flops_per_token(model_config_of(cfg), 2048, convention="official").per_token)


@pytest.mark.parametrize("path", sorted((ROOT / "recipes" / "mini" / "suites").glob("*.yaml")), ids=lambda p: p.stem)
def test_miniature_suites_expand(path):
    import yaml

    runs = expand(path)
    spec = yaml.safe_load(path.read_text())
    assert runs and spec["report"] in ("stability", "comparison", "sampling", "test_time") and spec["claim"].strip()
    for run in runs:
        parse_recipe(run.recipe, [a for k, v in run.overrides.items() for a in (f"--{k}", str(v))])


def test_param_limited_suites_hold_parameters_then_flops_equal():
    """`parcae mini param_limited`: same unique blocks, > 20 tokens per non-embedding parameter; the _flops suite:
    the GPT's extra tokens are exactly what Parcae's loops cost by the App. D counting (hand-computed here)."""
    suite_dir = ROOT / "recipes" / "mini" / "suites"
    models = {}
    for run in expand(suite_dir / "param_limited.yaml"):
        cfg = parse_recipe(run.recipe, [a for k, v in run.overrides.items() for a in (f"--{k}", str(v))])
        with torch.device("meta"):
            counts = LoopedLM(model_config_of(cfg)).parameter_counts()
        non_embedding = counts["total"] - counts["embeddings"]
        assert counts["value_embeddings"] == 0 and cfg.max_tokens / non_embedding > 20
        models[run.recipe.stem] = (model_config_of(cfg), counts)
    (gpt, gpt_counts), (parcae, parcae_counts) = models["param_limited_gpt"], models["param_limited_parcae"]
    assert not gpt.looped and (parcae.mean_recurrence, parcae.backprop_depth) == (8, 4)
    for part in ("prelude", "recurrent", "coda"):  # the same unique blocks
        assert gpt_counts[part] == parcae_counts[part] > 0
    # GPT at d 32, 3 layers, seq 256, LM head counted (paper convention): 6·(blocks + final norm + head) + attention
    d, layers = 32, 3
    block = 4 * d * d + 2 * d * 128 + 2 * d  # q, k, v, o + MLP (d_ff 128) + two RMSNorm weights (QK-norm has none)
    gpt_per_token = 6 * (layers * block + d + 4096 * d) + 4 * d * 256 * 3 * layers
    assert flops_per_token(gpt, 256).per_token == gpt_per_token
    runs = {r.name: r for r in expand(suite_dir / "param_limited_flops.yaml")}
    for seed in (1234, 2345):
        assert runs[f"param_limited_gpt_seed{seed}"].tokens == int(1.71e12 / gpt_per_token)
        parcae_tokens = runs[f"param_limited_parcae_seed{seed}"].tokens
        assert math.ceil(parcae_tokens / (16 * 256)) == 819_200 // (16 * 256)  # the param_limited runs again
