"""Loop semantics: per-sequence depth at proportional cost, truncated backprop, telemetry, eval determinism."""

import math

import pytest
import torch

from parcae.model import Depths, LoopedLM


def _model(tiny_config, **overrides):
    torch.manual_seed(0)
    model = LoopedLM(tiny_config(**overrides))
    with torch.no_grad():  # official init zeroes output projections; perturb so every path matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _batch(cfg, B=5, S=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    h0 = torch.randn(B, S, cfg.d_model, generator=g) * cfg.state_std
    return ids, labels, h0


@pytest.mark.parametrize("injection", ["diagonal", "concat", "add", "diagonal_zoh"])
def test_per_sequence_depths_equal_running_each_sequence_alone(tiny_config, injection):
    model = _model(tiny_config, injection=injection).train()
    ids, labels, h0 = _batch(model.config)
    depths = Depths(no_grad=torch.tensor([0, 3, 1, 5, 0]), grad=torch.tensor([1, 2, 2, 2, 2]))
    out = model(ids, labels, depths=depths, initial_state=h0)
    # Sum of per-sequence mean losses, so gradients can be compared with solo runs added up.
    per_seq = torch.nn.functional.cross_entropy(out.logits.transpose(1, 2), labels, reduction="none").mean(1)
    per_seq.sum().backward()
    batched_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    for i in range(ids.shape[0]):
        solo = model(ids[i:i + 1], labels[i:i + 1], initial_state=h0[i:i + 1],
                     depths=Depths(no_grad=depths.no_grad[i:i + 1], grad=depths.grad[i:i + 1]))
        torch.testing.assert_close(out.logits[i:i + 1], solo.logits, atol=1e-5, rtol=1e-5)
        solo.loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(batched_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_recurrent_cost_is_proportional_to_the_sum_of_depths(tiny_config):
    model = _model(tiny_config)
    rows = []
    model.recurrent[0].register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    ids, labels, _ = _batch(model.config, B=6)
    depths = Depths(no_grad=torch.tensor([0, 0, 2, 7, 1, 0]), grad=torch.tensor([1, 2, 2, 2, 2, 2]))
    model(ids, labels, depths=depths)
    assert sum(rows) == int(depths.total.sum()) == 21   # masking to the max would run 6 x 9 = 54
    rows.clear()
    with torch.no_grad():
        model.eval()(ids, loops=3)
    assert rows == [6, 6, 6]


def test_truncated_backprop_equals_restarting_from_the_detached_state(tiny_config):
    model = _model(tiny_config, value_embeddings=False).train()  # so the hand-run below stays short
    ids, labels, h0 = _batch(model.config, B=2)
    h0.requires_grad_(True)
    out = model(ids, labels, depths=Depths.split(7, 3, 2), initial_state=h0)
    out.loss.backward()
    assert h0.grad is None  # h₀ only feeds the no-grad iterations: no gradient reaches it
    truncated = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # Independent construction: the state after 4 iterations, detached, then 3 iterations with gradient.
    with torch.no_grad():
        e = model.prelude_norm(model.prelude[0](model.wte(ids), model.rope))
        h = h0.detach()
        for _ in range(4):
            h = model.recurrent[0](model.injection(h, model.injection.input_term(e)), model.rope)
    out2 = model(ids, labels, depths=Depths.split(3, 3, 2), initial_state=h)
    torch.testing.assert_close(out.loss, out2.loss)
    out2.loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(truncated[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_full_backprop_when_backprop_depth_covers_every_iteration(tiny_config):
    model = _model(tiny_config, backprop_depth=16, value_embeddings=False).train()
    ids, labels, h0 = _batch(model.config, B=2)
    h0.requires_grad_(True)
    out = model(ids, labels, loops=5, initial_state=h0)
    out.loss.backward()
    assert h0.grad is not None and h0.grad.abs().sum() > 0
    ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    # Reference: the equations unrolled by hand, every iteration on the autograd tape.
    x = model.prelude[0](model.wte(ids), model.rope)
    e = model.prelude_norm(x)
    decay = torch.exp(-torch.nn.functional.softplus(model.injection.dt_bias) * torch.exp(model.injection.A_log))
    b_e = torch.nn.functional.softplus(model.injection.dt_bias) * (e @ model.injection.B.T)
    h = h0.detach()
    for _ in range(5):
        h = model.recurrent[0](decay * h + b_e, model.rope)
    logits = model.wte.weight @ model.final_norm(model.coda[0](model.readout(h), model.rope)).unsqueeze(-1)
    ref = torch.nn.functional.cross_entropy(logits.squeeze(-1).flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss, ref, atol=1e-6, rtol=1e-6)
    ref.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_activation_memory_grows_with_backprop_depth_not_with_loops(tiny_config):
    model = _model(tiny_config).train()
    ids, labels, h0 = _batch(model.config, B=2)

    def saved_bytes(depths):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels, depths=depths, initial_state=h0)
        return total

    k1, k2, k4 = (saved_bytes(Depths.split(k, k, 2)) for k in (1, 2, 4))
    assert saved_bytes(Depths.split(30, 2, 2)) == k2      # 28 more iterations, all without grad: free
    assert saved_bytes(Depths.split(30, 4, 2)) == k4
    assert k2 > k1 and k4 - k2 == 2 * (k2 - k1)           # each backpropagated iteration costs the same


def test_eval_runs_exactly_the_requested_loops_deterministically(tiny_config):
    model = _model(tiny_config).eval()
    ids, _, _ = _batch(model.config)
    rows = []
    model.recurrent[0].register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        a = model(ids, loops=6).logits
        b = model(ids, loops=6).logits
        c = model(ids).logits
    assert len(rows) == 6 + 6 + model.config.mean_recurrence
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # like-init noise is seeded in eval
    assert not torch.equal(a, c)


def test_like_init_state_statistics(tiny_config):
    cfg = tiny_config(d_model=64)
    model = LoopedLM(cfg)
    e = torch.zeros(64, 32, 64)
    h = model._initial_state(e, None, state_seed=3)
    std = math.sqrt(2 / (5 * 64))
    assert abs(h.std().item() / std - 0.9866) < 0.02  # std of N(0, σ²) truncated at ±3σ is 0.9866σ
    assert h.abs().max() <= 3 * std + 1e-7
    torch.testing.assert_close(h, model._initial_state(e, None, state_seed=3), atol=0, rtol=0)
    assert torch.count_nonzero(LoopedLM(tiny_config(state_init="zero"))._initial_state(e, None, None)) == 0


def test_telemetry_reports_spectral_radius_state_norms_and_residual(tiny_config):
    model = _model(tiny_config, value_embeddings=False).eval()
    ids, _, h0 = _batch(model.config, B=3)
    depths = Depths(no_grad=torch.tensor([0, 0, 0]), grad=torch.tensor([2, 4, 3]))
    with torch.no_grad():
        out = model(ids, depths=depths, initial_state=h0, telemetry=True)
        inj = model.injection
        decay = torch.exp(-torch.nn.functional.softplus(inj.dt_bias) * torch.exp(inj.A_log))
        # hand-run sequence 1 (depth 4) and record its states
        e = model.prelude_norm(model.prelude[0](model.wte(ids[1:2]), model.rope))
        states = [h0[1:2]]
        for _ in range(4):
            states.append(model.recurrent[0](decay * states[-1] + inj.input_term(e), model.rope))
    t = out.telemetry
    torch.testing.assert_close(t["spectral_radius"], decay.max())
    torch.testing.assert_close(t["mean_decay"], decay.mean())
    assert t["depth"].tolist() == [2, 4, 3] and len(t["state_norm"]) == 5
    # iteration 4 is run by sequence 1 alone
    torch.testing.assert_close(t["state_norm"][4], states[4].norm(dim=-1).mean(), rtol=1e-5, atol=1e-5)
    assert t["final_state_norm"] > 0 and 0 < t["rel_residual"] < 10


def test_concat_spectral_radius_is_the_largest_eigenvalue_of_the_state_block(tiny_config):
    model = _model(tiny_config, injection="concat")
    W = model.injection.proj.weight.detach()[:, :64].double().numpy()
    import numpy as np
    assert abs(model.injection.spectral_radius().item() - np.abs(np.linalg.eigvals(W)).max()) < 1e-5
    with torch.no_grad():
        model.injection.proj.weight[:, :64] = 1.5 * torch.eye(64)
    assert model.injection.spectral_radius().item() == pytest.approx(1.5)


def test_diagonal_transition_is_stable_for_any_parameters(tiny_config):
    model = _model(tiny_config)
    with torch.no_grad():
        model.injection.A_log.uniform_(-30, 10)
        model.injection.dt_bias.uniform_(-30, 30)
    # exp(−Δa) with Δ, a > 0: never above 1 (it can round to exactly 1.0 in fp32 when Δa < 6e-8).
    assert 0 <= model.injection.spectral_radius().item() <= 1
    with torch.no_grad():
        model.injection.A_log.uniform_(-3, 3)
        model.injection.dt_bias.uniform_(-3, 3)
    assert model.injection.spectral_radius().item() < 1


def test_zoh_gain_matches_the_closed_form(tiny_config):
    model = _model(tiny_config, injection="diagonal_zoh")
    inj = model.injection
    with torch.no_grad():
        inj.A_log.copy_(torch.linspace(-3, 3, 64))
        inj.dt_bias.copy_(torch.linspace(-12, 4, 64))
    delta = torch.log1p(torch.exp(inj.dt_bias.double()))
    a = torch.exp(inj.A_log.double())
    expected = (1 - torch.exp(-delta * a)) / a
    torch.testing.assert_close(inj.gain().double(), expected, rtol=1e-5, atol=1e-9)
    assert (inj.gain() <= torch.nn.functional.softplus(inj.dt_bias) * (1 + 1e-6)).all()  # 0 < g ≤ Δ
    # Small Δa: the exact ZOH gain tends to Euler's Δ; expm1 keeps it accurate where 1 − exp loses digits.
    with torch.no_grad():
        inj.A_log.fill_(0.0)
        inj.dt_bias.fill_(-20.0)
    torch.testing.assert_close(inj.gain(), torch.nn.functional.softplus(inj.dt_bias), rtol=1e-6, atol=0)


def test_activation_checkpointing_gives_the_same_gradients_with_less_saved_memory(tiny_config):
    model = _model(tiny_config).train()
    ids, labels, h0 = _batch(model.config, B=3)
    depths = Depths(no_grad=torch.tensor([1, 0, 3]), grad=torch.tensor([2, 1, 2]))

    def run():
        saved = 0

        def pack(t):
            nonlocal saved
            saved += t.numel() * t.element_size()
            return t

        model.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(ids, labels, depths=depths, initial_state=h0)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, saved

    loss, grads, saved = run()
    model.checkpoint_iterations = True
    loss_ckpt, grads_ckpt, saved_ckpt = run()
    torch.testing.assert_close(loss, loss_ckpt)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ckpt[name], atol=1e-6, rtol=1e-5, msg=name)
    assert saved_ckpt < 0.8 * saved
