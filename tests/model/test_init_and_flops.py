"""Initialisation values (official parcae_lm/models/parcae/init.py) and FLOP accounting (paper App. D)
against hand computation."""

import math

import pytest
import torch

from parcae.model import LoopedLM, flops_per_token, preset, tokens_for_budget
from parcae.model.flops import inference_flops_per_token


def test_official_initialisation(tiny_config):
    torch.manual_seed(0)
    model = LoopedLM(tiny_config(d_model=64, injection="diagonal"))
    inj = model.injection
    torch.testing.assert_close(inj.decay(), torch.full((64,), 1 / math.sqrt(5)))   # Ā = 0.447·I
    torch.testing.assert_close(torch.nn.functional.softplus(inj.dt_bias), torch.full((64,), 0.5 * math.log(5)))
    assert torch.equal(inj.B, torch.eye(64))
    C = model.readout.weight
    torch.testing.assert_close(C @ C.T, 0.4 * torch.eye(64), atol=1e-5, rtol=0)      # C ≈ √0.4 · orthogonal
    for block in [*model.prelude, *model.recurrent, *model.coda]:
        assert block.attn.out_proj.weight.abs().sum() == 0 and block.mlp.down_proj.weight.abs().sum() == 0
    assert abs(model.value_embeds["2"].weight.std().item() - 1.0) < 0.02
    assert abs(model.wte.weight.std().item() - math.sqrt(2 / (5 * 64))) < 0.1 * math.sqrt(2 / (5 * 64))


def test_scaled_init_is_nonzero_everywhere(tiny_config):
    model = LoopedLM(tiny_config(init="scaled", block="sandwich", mlp="swiglu", injection="concat"))
    for name, p in model.named_parameters():
        assert p.abs().sum() > 0, name


def _hand_flops(d, F, V, P, R, C, n_ve_tables, mu, bwd, S, convention):
    block = 4 * d * d + 2 * d * F + 2 * d  # q k v o, up/down, two norms
    gates_in_core = 0
    core = R * block + 2 * d + d * d + gates_in_core       # + A_log, dt_bias, B
    other = (P + C) * block + d * d + 2 * d                # + readout C, prelude norm, final norm
    if convention == "paper":
        other += V * d                                     # unembedding counted, value tables not
    else:
        other += n_ve_tables * V * d
    matmul = 2 * (mu - bwd) * core + 6 * (other + bwd * core)
    attention = 4 * d * S * (3 * (P + C) + mu * R + 2 * bwd * R)
    return matmul, attention


@pytest.mark.parametrize("convention", ["paper", "official"])
def test_flops_per_token_matches_hand_count(tiny_config, convention):
    # no value embeddings on the recurrent block (index 1 of 3 is not a VE layer), so gates stay outside core
    cfg = tiny_config(d_model=64, d_ff=256, vocab_size=128, mean_recurrence=6, backprop_depth=3)
    fb = flops_per_token(cfg, seq_len=32, convention=convention)
    gates = 2 * 32 * 4  # VE gates on layers 0 and 2 (32 → 4 heads), counted once per token
    matmul, attention = _hand_flops(64, 256, 128, 1, 1, 1, 2, 6, 3, 32, convention)
    assert fb.attention == attention
    assert fb.per_token == matmul + 6 * gates + attention


def test_gpt_flops_are_6n_plus_attention():
    cfg = preset("gpt-140m")
    fb = flops_per_token(cfg, seq_len=2048)
    n = 143_141_184 - 3 * 32768 * 768  # paper convention: all but the value tables (wte counted as the head)
    assert fb.per_token == 6 * n + 4 * 768 * 2048 * 3 * 6


def test_no_grad_iterations_cost_a_third_of_grad_ones():
    cfg = preset("parcae-140m")
    base = flops_per_token(cfg, no_grad_iterations=0, grad_iterations=4)
    more = flops_per_token(cfg, no_grad_iterations=4, grad_iterations=4)
    more_grad = flops_per_token(cfg, no_grad_iterations=0, grad_iterations=8)
    core_attn_fwd = 4 * 768 * 2048 * 2  # 2 recurrent layers
    assert more.per_token - base.per_token == 4 * (2 * base.core_params + core_attn_fwd)
    assert more_grad.per_token - base.per_token == 4 * (6 * base.core_params + 3 * core_attn_fwd)


def test_tokens_for_budget_inverts_flops_per_token():
    cfg = preset("parcae-140m")
    per_token = flops_per_token(cfg).per_token
    assert tokens_for_budget(cfg, 16e18) == int(16e18 / per_token)


def test_inference_flops_count_each_iteration_and_each_read_out():
    # mini-demo by hand: P/R/C 1/1/1 prenorm relu² blocks at d 64 (q k v o 4·64², up/down 2·64·256, 2 norms;
    # the q/k norms have no weights), Ā and Δ (2·64) per iteration and B (64²) once (B̄e is computed before the
    # loop), readout C (64²), prelude and final norm, tied head 4096·64.
    d, block = 64, 4 * 64 * 64 + 2 * 64 * 256 + 2 * 64
    once, per_iteration, per_readout = block + 2 * d + d * d, block + 2 * d, d * d + block + 4096 * d
    cfg = preset("mini-demo")
    assert inference_flops_per_token(cfg, 8) == 2 * (once + 8 * per_iteration + per_readout)
    # kl checked at 5 iterations: five read-outs; attention adds 4·d·context per layer (1 + 5 + 5 layers)
    assert inference_flops_per_token(cfg, 5, readouts=5, context=100) == \
        2 * (once + 5 * per_iteration + 5 * per_readout) + 4 * d * 100 * 11
    gpt = preset("gpt-140m")  # no loop: every block once; value-embedding lookups cost nothing
    assert inference_flops_per_token(gpt, 8) == 2 * (143_141_184 - 3 * 32768 * 768)
