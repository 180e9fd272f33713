"""Our model against numbers produced by running the official code (tests/assets/official, see its README).

For each of the three injections and the GPT baseline: logits at every stored T within 1e-5, the loss of
the stored (no-grad, grad) split within 1e-6 and every gradient within 1e-5 relative.
"""

import pytest
import torch

from conftest import OFFICIAL_FIXTURES
from parcae.model import Depths, config_from_official, from_official, to_official
from parcae.model.official import key_map


def _load(path):
    return torch.load(path, weights_only=False)


@pytest.fixture(params=OFFICIAL_FIXTURES, ids=lambda p: p.stem)
def fixture(request):
    return _load(request.param)


def test_all_four_fixtures_present():
    assert {p.stem for p in OFFICIAL_FIXTURES} == {
        "official_gpt_tiny", "official_parcae_tiny_add", "official_parcae_tiny_diagonal",
        "official_parcae_tiny_linear"}


def test_logits_match_at_every_stored_depth(fixture):
    model = from_official(fixture["state_dict"], fixture["config"]).eval()
    assert model.config.injection == {"diagonal": "diagonal", "linear": "concat", "add": "add",
                                      "gpt": "none"}[fixture["injection"]]
    for loops, expected in fixture["logits"].items():
        with torch.no_grad():
            out = model(fixture["input_ids"], loops=loops if model.config.looped else None,
                        initial_state=fixture["h0"])
        assert out.logits.shape == expected.shape
        torch.testing.assert_close(out.logits, expected, atol=1e-5, rtol=0)


def test_loss_and_every_gradient_match_for_the_stored_split(fixture):
    model = from_official(fixture["state_dict"], fixture["config"]).train()
    ids, labels = fixture["input_ids"], fixture["labels"]
    if model.config.looped:
        n, k = fixture["split"]
        depths = Depths(no_grad=torch.full((ids.shape[0],), n), grad=torch.full((ids.shape[0],), k))
        out = model(ids, labels, depths=depths, initial_state=fixture["h0"])
    else:
        out = model(ids, labels)
    assert abs(out.loss.item() - fixture["loss"].item()) <= 1e-6
    out.loss.backward()
    names = key_map(model.config)
    params = dict(model.named_parameters())
    assert len(fixture["grads"]) == len(params)  # every parameter has a reference gradient
    for official_name, expected in fixture["grads"].items():
        ours = params[names[official_name]].grad
        rel = (ours - expected).abs().max() / expected.abs().max()
        assert rel <= 1e-5, f"{official_name}: relative gradient error {rel:.2e}"


def test_round_trip_to_official_is_exact(fixture):
    model = from_official(fixture["state_dict"], fixture["config"])
    state, config = to_official(model)
    assert set(state) == set(fixture["state_dict"])
    for key, value in fixture["state_dict"].items():
        if key == "lm_head.weight" and not model.config.looped:
            # The official GPT's untied head is never read by its forward; we drop it and emit wteᵀ.
            assert state[key].shape == value.shape
            continue
        atol = 1e-6 if key == "freqs_cis" else 0.0  # RoPE is recomputed, all weights copied exactly
        torch.testing.assert_close(state[key], value, atol=atol, rtol=0, msg=key)
    assert config_from_official(config) == model.config
    again = from_official(state, config)
    for (k1, v1), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_conversion_refuses_what_it_cannot_place():
    fx = _load(OFFICIAL_FIXTURES[2])  # diagonal
    sd, cfg = dict(fx["state_dict"]), fx["config"]
    with pytest.raises(ValueError, match="transformer.mystery.weight"):
        from_official({**sd, "transformer.mystery.weight": torch.zeros(3)}, cfg)
    missing = {k: v for k, v in sd.items() if k != "transformer.adapter.B"}
    with pytest.raises(ValueError, match="injection.B"):
        from_official(missing, cfg)
    with pytest.raises(ValueError, match="transformer.C.weight"):
        from_official({**sd, "transformer.C.weight": torch.zeros(3, 3)}, cfg)
    with pytest.raises(ValueError, match="lm_head"):
        from_official({**sd, "lm_head.weight": sd["lm_head.weight"] + 1}, cfg)
    with pytest.raises(ValueError, match="block_class_name"):
        from_official(sd, {**cfg, "block_class_name": "SandwichBlock"})
    with pytest.raises(ValueError, match="recurrent_embedding_dimension"):
        from_official(sd, {**cfg, "recurrent_embedding_dimension": 32})
    with pytest.raises(ValueError, match="injection_type"):
        from_official(sd, {**cfg, "injection_type": "ffn"})


def test_to_official_refuses_setups_the_official_code_lacks(tiny_config):
    from parcae.model import LoopedLM

    for overrides, field in ((dict(block="sandwich"), "block"), (dict(mlp="swiglu"), "mlp"),
                             (dict(injection="diagonal_zoh"), "diagonal_zoh"), (dict(readout=False), "readout")):
        with pytest.raises(ValueError, match=field):
            to_official(LoopedLM(tiny_config(**overrides)))
