"""Depth samplers (paper Alg. 3-4): distributions, truncation split, seeding, resume and rank slicing."""

import math

import pytest
import torch

from parcae.model import DepthSampler, Depths


def test_truncated_poisson_split_and_mean():
    s = DepthSampler("poisson_truncated", mean_recurrence=8, backprop_depth=4)
    d = s(step=3, batch_size=50_000)
    total = d.total
    assert total.min() >= 1
    assert torch.equal(d.grad, total.clamp(max=4)) and torch.equal(d.no_grad, total - d.grad)
    # E[max(X, 1)] for X ~ Poisson(μ) is μ + P(X = 0) = μ + e^{-μ}; Var ≈ μ.
    assert abs(total.double().mean().item() - (8 + math.exp(-8))) < 4 * math.sqrt(8 / 50_000)
    assert abs(total.double().var().item() - 8) < 0.3
    # k = min(T, μ_bwd): exactly P(T <= 3) of sequences backprop through fewer than 4 iterations
    p_small = sum(math.exp(-8) * 8**t / math.factorial(t) for t in range(4))
    assert abs((d.grad < 4).double().mean().item() - p_small) < 0.005


def test_same_step_same_depths_and_steps_differ():
    s = DepthSampler(mean_recurrence=8, backprop_depth=4)
    assert torch.equal(s(10, 32).total, s(10, 32).total)      # a resumed run redraws the same depths
    assert not torch.equal(s(10, 32).total, s(11, 32).total)


def test_ranks_take_disjoint_slices_of_the_global_draw():
    s = DepthSampler(mean_recurrence=6, backprop_depth=3)
    whole = s(7, batch_size=8, rank=0, world_size=1).total
    parts = [s(7, batch_size=4, rank=r, world_size=2).total for r in range(2)]
    # rank r holds global rows r, r + 2, ...: what DistributedSampler gives it of the same global batch
    assert torch.equal(torch.stack(parts, dim=1).flatten(), whole)
    with pytest.raises(ValueError, match="rank"):
        s(7, batch_size=4, rank=2, world_size=2)


def test_per_batch_uses_one_depth_for_every_sequence_and_rank():
    s = DepthSampler(mean_recurrence=8, backprop_depth=4, granularity="per_batch")
    draws = [s(step, 16, rank=r, world_size=2).total for step in range(20) for r in range(2)]
    assert all(len(set(d.tolist())) == 1 for d in draws)
    assert torch.equal(s(5, 16, 0, 2).total, s(5, 16, 1, 2).total)
    assert len({d[0].item() for d in draws}) > 3


def test_lognormal_poisson_follows_paper_algorithm_3():
    s = DepthSampler("poisson_lognormal", mean_recurrence=8, backprop_depth=4, granularity="per_sequence")
    d = s(1, 100_000)
    assert (d.grad == 4).all() and d.no_grad.min() >= 1
    # n − 1 ~ Poisson(e^τ) with E[e^τ] = μ_rec − μ_bwd
    assert abs((d.no_grad - 1).double().mean().item() - 4) < 0.05
    # heavier tail than Poisson(4): the log-normal rate adds variance
    assert (d.no_grad - 1).double().var().item() > 4 * 1.2


def test_fixed_and_expected_iterations():
    s = DepthSampler("fixed", mean_recurrence=5, backprop_depth=2)
    d = s(0, 3)
    assert d.no_grad.tolist() == [3, 3, 3] and d.grad.tolist() == [2, 2, 2]
    assert s.expected_iterations() == (3.0, 2.0)


def test_bad_sampler_settings_name_the_field():
    for kwargs, field in ((dict(scheme="uniform"), "scheme"), (dict(granularity="per_token"), "granularity"),
                          (dict(backprop_depth=0), "backprop_depth"), (dict(mean_recurrence=0), "mean_recurrence")):
        with pytest.raises(ValueError, match=field):
            DepthSampler(**kwargs)
    with pytest.raises(ValueError):
        Depths(no_grad=torch.tensor([0]), grad=torch.tensor([0]))
    with pytest.raises(ValueError, match="loops"):
        Depths.split(0, 4, 2)


def test_huginn_sampler_matches_its_definition():
    s = DepthSampler("huginn", mean_recurrence=4, backprop_depth=4, granularity="per_sequence")
    d = s(2, 200_000)  # defined at mu_rec == mu_bwd, unlike Alg. 3
    assert torch.equal(d.grad, d.total.clamp(max=4)) and d.total.min() >= 1
    # E[T] = E[Poisson(rate)] + 1 = E[rate] + 1 = mu_rec + 1, with the log-normal adding variance
    assert abs(d.total.double().mean().item() - 5.0) < 0.03
    assert d.total.double().var().item() > 4 * 1.2
