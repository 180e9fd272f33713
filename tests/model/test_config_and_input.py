"""Impossible configs and bad inputs fail with a one-line ValueError naming the field or value."""

import pytest
import torch

from parcae.model import LoopedLM, ModelConfig


@pytest.mark.parametrize("overrides, field", [
    (dict(d_model=60, n_heads=8), "n_heads"),
    (dict(backprop_depth=0), "backprop_depth"),
    (dict(mean_recurrence=0), "mean_recurrence"),
    (dict(injection="gru"), "injection"),
    (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(d_model=16, n_heads=2), "d_model"),
    (dict(n_recurrent=0), "n_recurrent"),
    (dict(n_prelude=-1), "n_prelude"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(depth_scheme="poisson_lognormal", mean_recurrence=4, backprop_depth=4), "mean_recurrence"),
])
def test_impossible_configs_name_the_field(tiny_config, overrides, field):
    with pytest.raises(ValueError, match=field) as info:
        tiny_config(**overrides)
    assert "\n" not in str(info.value)


def test_loops_must_be_positive_integers(tiny_config):
    model = LoopedLM(tiny_config()).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="loops"):
            model(ids, loops=bad)


def test_gpt_rejects_loop_counts(tiny_config):
    gpt = LoopedLM(tiny_config(injection="none")).eval()
    ids = torch.zeros(1, 4, dtype=torch.long)
    gpt(ids, loops=1)
    with pytest.raises(ValueError, match="fixed-depth"):
        gpt(ids, loops=4)


def test_token_ids_outside_the_vocabulary(tiny_config):
    model = LoopedLM(tiny_config(vocab_size=100))  # padded to 128
    with pytest.raises(ValueError, match=r"token id 128 is outside the vocabulary \[0, 128\)"):
        model(torch.tensor([[1, 2, 128]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[1, -1]]))
    with pytest.raises(ValueError, match="batch, sequence"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(1, 3))


def test_sequences_longer_than_the_position_table_extend_it_exactly(tiny_config):
    model = LoopedLM(tiny_config(block_size=16)).eval()
    ids = torch.randint(0, 128, (2, 40))
    h0 = torch.randn(2, 40, 64) * 0.05
    with torch.no_grad():
        long = model(ids, loops=3, initial_state=h0).logits
        model_fresh = LoopedLM(tiny_config(block_size=16)).eval()
        model_fresh.load_state_dict(model.state_dict())
        short = model_fresh(ids[:, :16], loops=3, initial_state=h0[:, :16]).logits
    assert long.shape == (2, 40, 128)
    torch.testing.assert_close(long[:, :16], short, atol=1e-5, rtol=0)  # causal: prefix unchanged


def test_depths_and_initial_state_shapes_are_checked(tiny_config):
    from parcae.model import Depths
    model = LoopedLM(tiny_config())
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="depths has 3 entries"):
        model(ids, depths=Depths.split(3, 2, 3))
    with pytest.raises(ValueError, match="initial_state"):
        model(ids, initial_state=torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match="not both"):
        model(ids, loops=2, depths=Depths.split(2, 2, 2))


def test_modelconfig_defaults_are_the_paper_140m():
    cfg = ModelConfig()
    assert (cfg.d_model, cfg.n_prelude, cfg.n_recurrent, cfg.n_coda, cfg.mean_recurrence, cfg.backprop_depth,
            cfg.injection, cfg.padded_vocab_size) == (768, 2, 2, 2, 8, 4, "diagonal", 32768)
