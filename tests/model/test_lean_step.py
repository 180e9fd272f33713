"""The cached step's shortcuts give the bits of the formulas they replace (torch.equal, not a tolerance): RoPE from
per-step rotation rows, queries and keys rotated and QK-normed together, RMSNorm as one rms_norm call without
gradient, the injection's decay computed once per loop."""

import pytest
import torch

from parcae.model import LoopedLM
from parcae.model.layers import RMSNorm, apply_rope, rope_rows, rope_table


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_rows_rotate_exactly_like_the_position_table(dtype):
    torch.manual_seed(0)
    table = rope_table(300, 16, 50_000.0)
    positions = torch.randint(0, 300, (3, 5))
    x = (torch.randn(3, 5, 6, 16) * 4).to(dtype)
    reference = apply_rope(x, table[positions])              # the per-pair formula, rows picked per token
    assert torch.equal(apply_rope(x, rope_rows(table, positions)), reference)
    contiguous = torch.arange(5).expand(3, 5)                 # and the full forward's table slice
    assert torch.equal(apply_rope(x, rope_rows(table, contiguous)), apply_rope(x, table))


def test_queries_and_keys_rotated_together_equal_each_rotated_alone(tiny_config):
    torch.manual_seed(0)
    attn = LoopedLM(tiny_config(n_kv_heads=2)).recurrent[0].attn
    rows = rope_rows(rope_table(64, attn.head_dim, 50_000.0), torch.randint(0, 64, (4, 1)))
    q, k = torch.randn(4, 1, attn.n_heads, attn.head_dim), torch.randn(4, 1, attn.kv_heads, attn.head_dim)
    together = attn._rotate(torch.cat([q, k], 2), rows).split([attn.n_heads, attn.kv_heads], 2)
    assert attn.qk_norm
    assert torch.equal(together[0], attn._rotate(q, rows)) and torch.equal(together[1], attn._rotate(k, rows))


@pytest.mark.parametrize("shape", [(1, 1, 64), (8, 1, 64), (3, 17, 96)])
def test_rmsnorm_without_gradient_is_its_training_formula_bit_for_bit(shape):
    torch.manual_seed(0)
    norm = RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.copy_(torch.randn(shape[-1]))
    x = torch.randn(shape) * 3
    with torch.no_grad():
        fast = norm(x)
    xf = x.float()
    formula = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype) * norm.weight
    assert torch.equal(fast, formula.detach())
    assert torch.equal(norm(x).detach(), formula.detach())  # with gradient: the same ops, autograd's backward


@pytest.mark.parametrize("injection", ["diagonal", "add", "concat"])
def test_bound_injection_equals_the_injection(tiny_config, injection):
    torch.manual_seed(0)
    cfg = tiny_config(injection=injection)
    inj = LoopedLM(cfg).injection
    with torch.no_grad():
        for p in inj.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        h, drive = torch.randn(2, 3, cfg.d_model), torch.randn(2, 3, cfg.d_model)
        assert torch.equal(inj.bound()(h, drive), inj(h, drive))
