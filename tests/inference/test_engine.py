"""The generation engine against the model's own full forward: cached = uncached, batched = alone, exit rules and
KV policies by their defining behaviour. Tiny random models (d = 64), CPU fp32."""

import dataclasses
import math

import pytest
import torch

from conftest import perturb_weights
from parcae.inference import Engine, ExitRule, KVPolicy, Sampling
from parcae.inference.exits import ForcedDepth
from parcae.model import LoopedLM, ModelConfig
from parcae.model.state import positional_noise

FAMILIES = {
    "parcae": dict(n_kv_heads=2),
    "rdm": dict(injection="concat", block="sandwich", readout=False, prelude_norm=False, mlp="swiglu",
                qk_norm=False, value_embeddings=False, init="scaled"),
    "gpt": dict(injection="none"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(family="parcae", seed=0, **overrides):
    cfg = ModelConfig(name=f"tiny-{family}", **{**dict(vocab_size=96, block_size=128, d_model=64, n_heads=4, d_ff=128,
                      n_prelude=1, n_recurrent=2, n_coda=1, mean_recurrence=3, backprop_depth=2),
                      **FAMILIES[family], **overrides})
    torch.manual_seed(seed)
    return perturb_weights(LoopedLM(cfg).eval())


def loops_kw(model, loops):
    return {"loops": loops} if model.config.looped else {}


@pytest.mark.parametrize("family", ["parcae", "rdm", "gpt"])
def test_cached_generation_equals_the_full_forward(family):
    model = tiny_model(family)
    loops = 3 if model.config.looped else None
    engine = Engine(model, loops=loops)
    prompt = [0, 17, 4, 33, 8]
    events = list(engine.stream([prompt], max_new_tokens=64))
    generated = [e.tokens[0] for e in events]
    assert len(generated) == 64
    cached = torch.stack([e.logits[0] for e in events])                         # [64, V]
    with torch.no_grad():
        full = model(torch.tensor([prompt + generated]), **loops_kw(model, loops)).logits[0]
    reference = full[len(prompt) - 1: -1]
    assert (cached - reference).abs().max().item() <= 1e-5
    assert generated == reference[:, : model.config.vocab_size].argmax(-1).tolist()   # greedy, token for token


@pytest.mark.parametrize("family", ["parcae", "rdm", "gpt"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_batched_generation_equals_each_prompt_alone(family, padding):
    model = tiny_model(family, seed=1)
    engine = Engine(model)
    prompts = [[0, 5, 6, 7, 8, 9, 10], [0, 40], [0, 3, 3, 50, 51]]
    sampling = Sampling(temperature=0.9, top_k=20, top_p=0.95, seed=7)
    stop = [11, 12, 13]  # common enough to end some rows early, at their own step
    batched = engine.generate(prompts, 24, sampling, stop_ids=stop, padding=padding, sequences=[0, 1, 2])
    alone = [engine.generate([p], 24, sampling, stop_ids=stop, sequences=[i])[0] for i, p in enumerate(prompts)]
    assert [g.tokens for g in batched] == [g.tokens for g in alone]
    assert [g.depths for g in batched] == [g.depths for g in alone]
    assert len({len(g.tokens) for g in batched}) > 1 or all(len(g.tokens) == 24 for g in batched)
    for g in batched:
        assert g.stopped == (g.tokens[-1] in stop) and all(t not in stop for t in g.tokens[:-1])


def test_batched_adaptive_generation_equals_alone():
    model = tiny_model("parcae", seed=2)
    engine = Engine(model, exit="latent-diff:0.2", max_loops=8, kv_policy="latest")
    prompts = [[0, 1, 2, 3, 4, 5], [0, 9]]
    batched = engine.generate(prompts, 16, padding="right")
    alone = [engine.generate([p], 16)[0] for p in prompts]
    assert [(g.tokens, g.depths) for g in batched] == [(g.tokens, g.depths) for g in alone]


# -- exit rules --------------------------------------------------------------------------------------------------
def states_and_logits_by_hand(model, token, T):
    """h_t and the logits read out from h_t, t = 1..T, of a lone first token, with the model's modules directly."""
    ids = torch.tensor([[token]])
    with torch.no_grad():
        x = model.wte(ids)
        ve = model.value_embeddings_of(ids)
        rope = model.rope
        for block in model.prelude:
            x = block(x, rope, ve.get(block.index))
        e = model.prelude_norm(x)
        drive = model.injection.input_term(e)
        h = positional_noise(0, torch.tensor([0]), torch.tensor([[0]]), model.config.d_model, model.config.state_std)
        states, logits = [h], []
        for _ in range(T):
            h = model.recurrent_step(h, drive, rope, ve)
            y = model.readout(h)
            for block in model.coda:
                y = block(y, rope, ve.get(block.index))
            states.append(h)
            logits.append(model.lm_head(y)[0, 0, : model.config.vocab_size])
    return states, logits


def rule_values_by_hand(rule, states, logits, checks):
    """The rule's value at each checked iteration (1-based), each compared with the previous check (Huginn's
    evaluators: h₀, the uniform distribution, H = +∞ and no argmax before the first)."""
    V = logits[0].numel()
    values, prev_h, prev_lp, prev_H, prev_arg, stable = [], states[0], torch.full((V,), -math.log(V)), math.inf, None, 0
    for t in checks:
        h, lp = states[t], torch.log_softmax(logits[t - 1], -1)
        if rule == "latent-diff":
            values.append(((h - prev_h).norm() / h.norm()).item())
        elif rule == "cosine":
            values.append(1 - ((h * prev_h).sum() / h.norm() / prev_h.norm()).item())
        elif rule in ("kl", "minp-kl"):
            if rule == "minp-kl":  # probabilities under 0.1 × the largest flattened to 1/V, renormalised
                p = lp.exp()
                p = torch.where(p < 0.1 * p.max(), torch.tensor(1.0 / V), p)
                lp = (p / p.sum()).log()
            values.append((prev_lp.exp() * (prev_lp - lp)).sum().item())
        elif rule == "entropy-diff":
            H = -(lp.exp() * lp).sum().item()
            values.append(abs(H - prev_H))
            prev_H = H
        else:
            arg = int(lp.argmax())
            stable = stable + 1 if arg == prev_arg else 0
            prev_arg = arg
            values.append(stable)
        prev_h, prev_lp = h, lp
    return values


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("rule", ["latent-diff", "cosine", "kl", "minp-kl", "entropy-diff", "argmax-stability"])
def test_each_exit_rule_stops_at_the_first_check_meeting_its_criterion(rule, every):
    model = tiny_model("parcae", seed=3)
    T, min_loops = 12, 2
    checks = list(range(min_loops, T + 1, every))   # iterations after which the rule is evaluated
    states, logits = states_and_logits_by_hand(model, 0, T)
    values = rule_values_by_hand(rule, states, logits, checks)
    if rule == "argmax-stability":
        threshold = 2
        met = [v >= threshold for v in values]
    else:  # a threshold inside the observed range, so the rule must pick the iteration itself
        threshold = sorted(values)[len(values) // 2] * 1.0001
        met = [v < threshold for v in values]
    expected = next((t for t, ok in zip(checks, met) if ok), T)
    engine = Engine(model, exit=f"{rule}:{threshold}", min_loops=min_loops, max_loops=T, exit_every=every)
    coda = TokenCounter(model.coda[0])
    event = next(iter(engine.stream([[0]], 1)))
    assert event.depths == [expected]
    torch.testing.assert_close(event.logits[0, :96], logits[expected - 1], atol=1e-5, rtol=0)
    # the coda runs once per check for the output rules (between checks nothing is read out), once otherwise
    assert coda.count == (len([t for t in checks if t <= expected]) + (expected not in checks)
                          if engine.exit.needs_logits else 1)


def test_min_and_max_loops_bound_the_depth_and_equal_bounds_are_fixed_depth():
    model = tiny_model("parcae", seed=4)
    loose = Engine(model, exit="latent-diff:10", min_loops=3, max_loops=6).generate([[0, 1, 2]], 8)[0]
    assert loose.depths == [3] * 8  # a threshold every iteration meets: exit as soon as allowed
    strict = Engine(model, exit="kl:1e-30", min_loops=1, max_loops=5).generate([[0, 1, 2]], 8)[0]
    assert strict.depths == [5] * 8  # never met: max_loops
    pinned = Engine(model, exit="kl", min_loops=4, max_loops=4, kv_policy="latest").generate([[0, 1, 2]], 8)[0]
    fixed = Engine(model, loops=4).generate([[0, 1, 2]], 8)[0]
    assert pinned.tokens == fixed.tokens


def test_exit_rule_parsing_and_auto_thresholds():
    assert ExitRule.parse("latent-diff").threshold == 0.03
    assert ExitRule.parse("kl").threshold == 1e-3
    assert ExitRule.parse("entropy-diff").threshold == 1e-3
    assert ExitRule.parse("argmax-stability").threshold == 5
    assert ExitRule.parse("kl:1e-4").threshold == 1e-4
    assert ExitRule.parse("cosine").threshold == 1e-3 and ExitRule.parse("minp-kl").threshold == 1e-5
    for bad in ("cos", "kl:0", "kl:-1", "kl:abc", "argmax-stability:2.5"):
        with pytest.raises(ValueError):
            ExitRule.parse(bad)


# -- KV policies -------------------------------------------------------------------------------------------------
def test_full_policy_computes_every_iteration_and_latest_only_the_ones_run():
    model = tiny_model("parcae", seed=5)
    prompt, n_new, T = [0, 4, 5], 12, 8
    full = Engine(model, exit="latent-diff:0.15", max_loops=T, kv_policy="full")
    latest = Engine(model, exit="latent-diff:0.15", max_loops=T, kv_policy="latest")
    g_full, g_latest = full.generate([prompt], n_new)[0], latest.generate([prompt], n_new)[0]
    prefill = len(prompt) - 1
    assert full.prefill_loops == T and latest.prefill_loops == model.config.mean_recurrence
    # full: every token runs max_loops (the last generated token is never fed back)
    assert full.iterations_run == prefill * T + n_new * T
    # latest: a token computes exactly the iterations its exit allowed, never one it skipped
    assert latest.iterations_run == prefill * latest.prefill_loops + sum(g_latest.depths)
    assert min(g_latest.depths) < T  # the rule did fire, so something was skipped


def test_latest_and_ring_equal_full_when_nothing_is_skipped():
    model = tiny_model("parcae", seed=6)
    prompt = [0, 7, 8, 9]
    never = "argmax-stability:1000"   # never fires: every token runs max_loops
    ref = Engine(model, loops=6).generate([prompt], 10)[0].tokens
    for policy in ("full", "latest", "ring:6", "ring:9"):
        assert Engine(model, exit=never, max_loops=6, kv_policy=policy).generate([prompt], 10)[0].tokens == ref


def test_ring_keeps_k_slots_per_recurrent_block_whatever_the_depth():
    model = tiny_model("parcae", seed=7)
    engine = Engine(model, loops=10, kv_policy="ring:3")
    cache = engine.new_cache(1, 16)
    list(engine.stream([[0, 1, 2]], 5))  # run once to see which slots a real generation allocates
    cache = engine.new_cache(1, 16)
    tokens = torch.tensor([[0, 1, 2]])
    cols = torch.arange(3)[None]
    engine.forward(cache, tokens, cols, cols, torch.ones(1, 3, dtype=torch.bool), torch.tensor([0]), adaptive=False)
    assert cache.slots == [3, 3]
    full_cache = Engine(model, loops=10).new_cache(1, 16)
    Engine(model, loops=10).forward(full_cache, tokens, cols, cols, torch.ones(1, 3, dtype=torch.bool),
                                    torch.tensor([0]), adaptive=False)
    assert full_cache.slots == [10, 10]
    assert cache.nbytes() < full_cache.nbytes()


def test_continuous_warm_start_begins_each_token_from_the_previous_final_state():
    model = tiny_model("parcae", seed=8)
    T = 3
    engine = Engine(model, loops=T, continuous=True)
    events = list(engine.stream([[0, 21]], 2))
    # By hand: token 0 from noise (its final state h_T), token 1 from h_T of token 0, in one full forward.
    states, _ = states_and_logits_by_hand(model, 0, T)
    h0 = torch.cat([states[0], states[-1]], dim=1)
    with torch.no_grad():
        ref = model(torch.tensor([[0, 21]]), loops=T, initial_state=h0).logits[0, 1]
    torch.testing.assert_close(events[0].logits[0], ref, atol=1e-5, rtol=0)
    cold = next(iter(Engine(model, loops=T).stream([[0, 21]], 1)))
    assert not torch.allclose(cold.logits[0], ref)


# -- sampling ----------------------------------------------------------------------------------------------------
def test_sampling_is_seeded_and_top_k_top_p_restrict_the_support():
    from parcae.inference import sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    def draws(s, n=200, seed=0):
        g = [torch.Generator().manual_seed(seed)]
        return {int(sample(logits, s, g, 4)[0]) for _ in range(n)}
    assert draws(Sampling(temperature=1.0, top_k=2)) == {0, 1}
    assert draws(Sampling(temperature=1.0, top_p=0.8)) == {0, 1}          # 0.5 + 0.3 reaches 0.8
    assert draws(Sampling(temperature=1.0, top_p=0.81)) == {0, 1, 2}
    assert draws(Sampling(temperature=1.0)) == {0, 1, 2, 3}
    assert draws(Sampling(temperature=0.0)) == {0}
    model = tiny_model("parcae", seed=9)
    s = Sampling(temperature=1.0, seed=3)
    a, b = (Engine(model).generate([[0, 1]], 12, s)[0].tokens for _ in range(2))
    c = Engine(model).generate([[0, 1]], 12, Sampling(temperature=1.0, seed=4))[0].tokens
    assert a == b and a != c


# -- bad input ---------------------------------------------------------------------------------------------------
def test_bad_requests_are_refused_with_a_message():
    parcae, gpt = tiny_model("parcae"), tiny_model("gpt")
    cases = [
        (lambda: Engine(parcae, exit="nope"), "unknown exit rule"),
        (lambda: Engine(parcae, kv_policy="sometimes"), "unknown KV policy"),
        (lambda: Engine(parcae, kv_policy="ring:0"), "ring:K"),
        (lambda: Engine(parcae, exit="kl:0"), "> 0"),
        (lambda: Engine(parcae, exit="kl", min_loops=5, max_loops=3), "max_loops"),
        (lambda: Engine(gpt, exit="kl"), "fixed-depth"),
        (lambda: Engine(parcae).generate([[0] * 120], 20), "context"),
        (lambda: Engine(parcae).generate([[]], 5), "no tokens"),
        (lambda: Engine(parcae).generate([[0]], -1), "max_new_tokens"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    assert KVPolicy.parse("ring:4").slots == 4


# -- cost: exited and idle rows compute nothing; few device reads ------------------------------------------------
class TokenCounter:
    """Counts the (row, token) pairs entering a module: the compute spent there, seen from outside the engine."""

    def __init__(self, module):
        self.count = 0
        module.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        self.count += args[0].shape[0] * args[0].shape[1]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("needs_logits", [False, True])
def test_exited_rows_cost_nothing_the_recurrent_compute_is_the_sum_of_the_depths(batch, needs_logits):
    model = tiny_model("parcae", seed=13)
    T, n_new = 8, 10
    rule = ForcedDepth(lambda n, r: 1 + (3 * n + 5 * r) % T, needs_logits)
    engine = Engine(model, exit=rule, max_loops=T, kv_policy="latest")
    prompts = [[0, 3 + b, 40 + 2 * b][: 2 + b % 2] for b in range(batch)]
    recurrent, coda = TokenCounter(model.recurrent[0]), TokenCounter(model.coda[0])
    generations = engine.generate(prompts, n_new, sequences=list(range(batch)))
    assert [g.depths for g in generations] == [[rule.depth(n, r) for n in range(n_new)] for r in range(batch)]
    depths = [d for g in generations for d in g.depths]
    prefill = batch * (max(map(len, prompts)) - 1)  # one chunk of the prompts but their last tokens, padding included
    assert recurrent.count == prefill * engine.prefill_loops + sum(depths)
    # The output-based check (coda + head) runs on the rows still looping, once per iteration they run.
    assert coda.count == prefill + (sum(depths) if needs_logits else batch * n_new)
    # The engine's own accounting (what elastic_nll turns into FLOPs) counts the same, padding left out (and the
    # prefill's pass through the coda, which reads nothing out to logits, is not a read-out).
    assert engine.iterations_run == sum(len(p) - 1 for p in prompts) * engine.prefill_loops + sum(depths)
    assert engine.readouts_run == (sum(depths) if needs_logits else batch * n_new)


@pytest.mark.parametrize("exit", [None, "latent-diff:0.15"])
def test_rows_without_a_real_token_cost_nothing_and_do_not_change_the_others(exit):
    model = tiny_model("parcae", seed=14)
    kw = dict(exit=exit, max_loops=6, kv_policy="latest") if exit else dict(loops=3)
    tokens = torch.tensor([[0, 5, 9], [0, 0, 0], [0, 7, 2], [0, 0, 0]])
    real = torch.tensor([[1, 1, 1], [0, 0, 0], [1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    cols = torch.arange(3).expand(4, 3)
    engine = Engine(model, **kw)
    recurrent = TokenCounter(model.recurrent[0])
    out = engine.forward(engine.new_cache(4, 8), tokens, cols, cols, real, torch.arange(4), adaptive=exit is not None)
    computed = recurrent.count
    alone = Engine(model, **kw)
    ref = alone.forward(alone.new_cache(2, 8), tokens[[0, 2]], cols[:2], cols[:2], real[[0, 2]],
                        torch.tensor([0, 2]), adaptive=exit is not None)
    assert computed == recurrent.count - computed                # the idle rows entered no block at all
    torch.testing.assert_close(out.logits[[0, 2]][real[[0, 2]]], ref.logits[real[[0, 2]]], atol=1e-5, rtol=0)
    assert out.depth[[1, 3]].eq(0).all()


HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """Counts the calls from parcae's code that read a tensor back to the host (a device sync on an accelerator)."""
    import sys

    calls = {"n": 0}
    for name in HOST_READS:
        def counting(self, *args, _real=getattr(torch.Tensor, name), **kwargs):
            if "/parcae/" in sys._getframe(1).f_code.co_filename:
                calls["n"] += 1
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    return calls


def test_fixed_depth_reads_the_device_once_per_generated_token(host_reads):
    model = tiny_model("parcae", seed=15)
    engine = Engine(model, loops=4)
    events = list(engine.stream([[0, 1, 2, 3], [0, 5], [0, 9, 9]], 12, Sampling(temperature=0.7, seed=1),
                                stop_ids=[7], sequences=[0, 1, 2]))
    assert host_reads["n"] == len(events)  # the sampled ids, nothing else


@pytest.mark.parametrize("policy", ["latest", "full"])
def test_adaptive_depth_reads_the_device_at_most_once_per_iteration(host_reads, policy):
    model = tiny_model("parcae", seed=15)
    engine = Engine(model, exit="kl:0.02", max_loops=8, kv_policy=policy)
    events = list(engine.stream([[0, 1, 2, 3], [0, 5], [0, 9, 9]], 12, sequences=[0, 1, 2]))
    reads, iterations = host_reads["n"], sum(max(e.depths) for e in events)
    assert reads <= iterations + len(events)   # one per iteration run, plus the sampled ids (with their depths)
    if policy == "full":                       # nothing leaves the batch early: no per-iteration read at all
        assert reads == len(events)


# -- the approximate KV policies against an independent reference ---------------------------------------------------
def source_iteration(policy, ran, t):
    """Which iteration's keys/values of an earlier token that ran ``ran`` iterations a later token reads at
    iteration t, written from the policies' definitions: full reads t (every token ran every iteration); latest reads
    t if the token ran it, else its last one; ring:K reads what slot t mod K holds, the token's last iteration
    congruent to t, or, if it never ran one, its last iteration."""
    if policy == "full":
        return t
    if policy == "latest":
        return t if t < ran else ran - 1
    K = int(policy.split(":")[1])
    congruent = [u for u in range(ran) if u % K == t % K]
    return congruent[-1] if congruent else ran - 1


class ReferenceView:
    """One token's attention layer, reading from every earlier token the entry the policy names (no cache tensors)."""

    def __init__(self, entries, key, j, t, policy, ran):
        self.entries, self.key, self.j, self.t, self.policy, self.ran = entries, key, j, t, policy, ran

    def update(self, k, v):
        self.entries[(self.key, self.j, self.t)] = (k[:, 0], v[:, 0])
        looped = self.key[0] == "loop"
        kv = [self.entries[(self.key, i, 0 if not looped else self.t if i == self.j else
                            source_iteration(self.policy, self.ran[i], self.t))] for i in range(self.j + 1)]
        keys = torch.stack([a for a, _ in kv], 1).transpose(1, 2)      # [1, kv_heads, j + 1, hd]
        values = torch.stack([b for _, b in kv], 1).transpose(1, 2)
        return keys, values, torch.ones(1, 1, 1, self.j + 1, dtype=torch.bool)


def reference_logits(model, ids, depths, ran, policy, sequence=0):
    """Logits of each token of ``ids`` recomputed one token at a time with the model's blocks: token j exits after
    depths[j] iterations (its output) and computes ran[j] of them (its keys/values)."""
    entries, out = {}, []
    with torch.no_grad():
        for j, token in enumerate(ids):
            x_ids = torch.tensor([[token]])
            rope, ve = model.rope[j:j + 1], model.value_embeddings_of(x_ids)
            view = lambda key, t=0: ReferenceView(entries, key, j, t, policy, ran)  # noqa: E731
            x = model.wte(x_ids)
            for block in model.prelude:
                x = block(x, rope, ve.get(block.index), view(("once", block.index)))
            drive = model.injection.input_term(model.prelude_norm(x))
            h = positional_noise(0, torch.tensor([sequence]), torch.tensor([[j]]), model.config.d_model,
                                 model.config.state_std)
            for t in range(ran[j]):
                h_next = model.injection(h, drive)
                for r, block in enumerate(model.recurrent):
                    h_next = block(h_next, rope, ve.get(block.index), view(("loop", r), t))
                h = h_next
                if t + 1 == depths[j]:
                    exit_state = h
            y = model.readout(exit_state)
            for block in model.coda:
                y = block(y, rope, ve.get(block.index), view(("once", block.index)))
            out.append(model.lm_head(y)[0, 0])
    return torch.stack(out)


@pytest.mark.parametrize("policy", ["full", "latest", "ring:3"])
def test_kv_policies_read_what_their_definition_says_when_tokens_exit_at_different_depths(policy):
    model = tiny_model("parcae", seed=16)
    T, n_new = 8, 9
    # row r's n-th token exits after script(n, r) iterations: 1..8, so tokens exit at different depths, reach
    # iterations other tokens skipped, and wrap the ring of 3 slots.
    script = lambda n, r: [3, 1, 7, 2, 8, 5, 1, 4, 6][(n + 4 * r) % 9]  # noqa: E731
    engine = Engine(model, exit=ForcedDepth(script), max_loops=T, kv_policy=policy)
    prompts = [[0, 12, 7, 30], [0, 55]]
    events = list(engine.stream(prompts, n_new, sequences=[0, 1], padding="right"))
    for r, prompt in enumerate(prompts):
        generated = [e.tokens[r] for e in events]
        ids = prompt + generated[:-1]
        P = engine.prefill_loops
        depths = [P] * (len(prompt) - 1) + [script(n, r) for n in range(n_new)]
        assert [e.depths[r] for e in events] == depths[len(prompt) - 1:]
        ran = depths if policy != "full" else [P] * (len(prompt) - 1) + [T] * n_new
        reference = reference_logits(model, ids, depths, ran, policy, sequence=r)[len(prompt) - 1:]
        cached = torch.stack([e.logits[r] for e in events])
        assert (cached - reference).abs().max().item() <= 1e-5


@pytest.mark.parametrize("policy", ["full", "latest", "ring:3"])
def test_cache_memory_is_what_the_policy_uses(policy):
    """Bytes against the count from the shape, at several depth mixes; latest never holds more than full."""
    model = tiny_model("parcae", seed=17)
    c, T = model.config, 8
    entry_bytes = 2 * c.kv_heads * c.head_dim * 4  # a key and a value, fp32
    sizes = {}
    for mix in ([1, 1, 2, 1], [2, 5, 3, 1], [8, 1, 1, 1], [3, 3, 3, 3]):
        for kind in (policy, "full"):
            engine = Engine(model, exit=ForcedDepth(lambda n, r: mix[(n + r) % 4]), max_loops=T, kv_policy=kind)
            cache = engine.new_cache(2, 6)
            tokens, cols = torch.tensor([[0, 4, 9], [0, 8, 8]]), torch.arange(3).expand(2, 3)
            for col in range(3):  # one token per step, as generation runs
                engine.forward(cache, tokens[:, col:col + 1], cols[:, col:col + 1], cols[:, col:col + 1],
                               torch.ones(2, 1, dtype=torch.bool), torch.tensor([0, 1]), adaptive=True)
            deepest = T if kind == "full" else max(mix[(n + r) % 4] for n in range(3) for r in range(2))
            assert cache.nbytes() == 2 * 6 * cache.entries_per_token_by_shape(deepest) * entry_bytes
            sizes[kind] = cache.nbytes()
            if kind == "ring:3":  # at most K slots per recurrent block whatever the depth
                assert cache.slots == [min(deepest, 3)] * c.n_recurrent
        assert sizes[policy] <= sizes["full"]


def test_an_exit_rule_alone_is_set_up_to_save_compute():
    model = tiny_model("parcae", seed=18)
    engine = Engine(model, exit="kl")
    mu = model.config.mean_recurrence
    assert (engine.max_loops, str(engine.policy), engine.prefill_loops) == (mu, "latest", mu)
    assert Engine(model, exit="kl", max_loops=4 * mu).prefill_loops == mu                     # never 4·μ unasked
    assert Engine(model, exit="kl", max_loops=4 * mu, kv_policy="full").prefill_loops == 4 * mu  # full needs all
    assert str(Engine(model).policy) == "full" and Engine(model).loops == mu


# -- self-speculative decoding -------------------------------------------------------------------------------------
@pytest.mark.parametrize("draft, k", [(1, 3), (2, 4), (4, 2)])
def test_speculative_greedy_equals_plain_greedy_at_the_target_depth(draft, k):
    model = tiny_model("parcae", seed=19)
    prompts = [[0, 5, 6, 7], [0, 40], [0, 3, 3, 50, 51, 2]]
    plain = Engine(model, loops=5).generate(prompts, 20, stop_ids=[11, 12], sequences=[0, 1, 2])
    engine = Engine(model, loops=5, speculate=(draft, k))
    spec = engine.generate(prompts, 20, stop_ids=[11, 12], sequences=[0, 1, 2])
    assert [g.tokens for g in spec] == [g.tokens for g in plain]
    for g in spec:   # each row's statistics come back with its tokens (nothing is left on the engine)
        s = g.speculation
        assert 0 <= s.accepted <= s.drafted and s.rounds >= len(g.tokens) / k and s.drafted <= k * s.rounds
    assert not hasattr(engine, "speculation")


def test_speculative_sampling_gives_each_row_what_it_gives_alone():
    """A row's random stream must not depend on its neighbours: with limits that differ per row, a shared draft
    width per round made a row draw a different number of drafts and uniforms in a batch than alone."""
    model = tiny_model("parcae", seed=19)
    prompts = [[0, 5, 6, 7], [0, 40], [0, 3, 3, 50, 51, 2], [0, 9, 9]]
    sampling = Sampling(temperature=1.0, seed=0)
    engine = Engine(model, loops=5, speculate=(1, 4))    # a shallow draft: rejections happen
    events = list(engine.stream(prompts, 30, sampling, limits=[30, 7, 19, 26], sequences=[0, 1, 2, 3]))
    batched = [[e.tokens[b] for e in events if e.active[b]] for b in range(4)]
    for b, (prompt, n) in enumerate(zip(prompts, [30, 7, 19, 26])):
        alone = engine.generate([prompt], n, sampling, sequences=[b])[0]
        assert batched[b] == alone.tokens
        assert events[-1].speculation[b] == alone.speculation

def test_speculative_sampling_draws_from_the_target_distribution():
    """The joint distribution of the first two tokens, estimated from 3,000 sampled rows, against the exact one
    computed from the model's full forward at the target depth (and far from the draft's own)."""
    model = tiny_model("parcae", seed=21, vocab_size=6)
    V, T, D, prompt, n = 6, 4, 1, [0, 3], 3000

    def exact(loops):
        with torch.no_grad():
            first = torch.softmax(model(torch.tensor([prompt]), loops=loops).logits[0, -1, :V] / 0.3, -1)
            rows = torch.tensor([prompt + [a] for a in range(V)])
            second = torch.softmax(model(rows, loops=loops).logits[:, -1, :V] / 0.3, -1)
        return first[:, None] * second                                                  # [V, V]

    engine = Engine(model, loops=T, speculate=(D, 2))
    samplings = [Sampling(temperature=0.3, seed=i) for i in range(n)]
    generations = engine.generate([prompt] * n, 2, samplings, sequences=[0] * n)
    counts = torch.zeros(V, V)
    for g in generations:
        counts[g.tokens[0], g.tokens[1]] += 1
    target, draft = exact(T), exact(D)
    tv = lambda a, b: 0.5 * (a - b).abs().sum().item()  # noqa: E731
    assert tv(counts / n, target) < 0.06        # sampling noise at n = 3000 over 36 cells is ~0.03
    assert tv(draft, target) > 0.2             # a test that would notice sampling from the draft instead


# -- depth options: checked and completed in one place -------------------------------------------------------------
def test_depth_options_resolve_to_one_canonical_value():
    from parcae.inference.options import DepthOptions

    parcae, gpt = tiny_model("parcae"), tiny_model("gpt")
    cfg, mu = parcae.config, parcae.config.mean_recurrence
    kl = DepthOptions(exit="kl").resolved(cfg)
    assert kl == DepthOptions(exit="kl:0.001", loops=None, min_loops=1, max_loops=mu, exit_every=1, kv_policy="latest")
    assert kl.resolved(cfg) == kl and kl.exit == "kl:0.001"
    assert DepthOptions(exit="kl:1e-3").resolved(cfg) == DepthOptions(exit="kl:0.001", kv_policy="latest").resolved(cfg)
    assert DepthOptions(exit="kl:1.234567891e-3").resolved(cfg).exit == "kl:0.001234567891"  # no digits lost
    assert DepthOptions(exit="argmax-stability").resolved(cfg) == DepthOptions(exit="argmax-stability:5.0").resolved(cfg)
    fixed = DepthOptions().resolved(cfg)
    assert fixed == DepthOptions(loops=mu, max_loops=mu, kv_policy="full") == DepthOptions(max_loops=mu).resolved(cfg)
    assert DepthOptions(loops=2, min_loops=2, exit_every=3).resolved(cfg) == DepthOptions(loops=2).resolved(cfg)
    assert DepthOptions().resolved(gpt.config).loops == 1 == DepthOptions(loops=1).resolved(gpt.config).loops
    rule = ForcedDepth(lambda n, r: 1)
    assert DepthOptions(exit=rule).resolved(cfg).exit is rule
    assert len({DepthOptions(exit=e).resolved(cfg) for e in ("kl", "kl:auto", "kl:1e-3", " kl:0.001")}) == 1
    engine = Engine.from_options(parcae, DepthOptions(exit="cosine:0.01"), seed=3)
    assert (engine.options, engine.seed, engine.max_loops) == (DepthOptions(exit="cosine:0.01").resolved(cfg), 3, mu)
    for depth, message in [(DepthOptions(loops=True), "loops must be an integer"),
                           (DepthOptions(loops=0), "loops must be an integer"),
                           (DepthOptions(continuous="yes"), "continuous must be"),
                           (DepthOptions(exit="kl", loops=3), "not both"),
                           (DepthOptions(kv_policy="ring:x"), "ring:K")]:
        with pytest.raises(ValueError, match=message):
            depth.resolved(cfg)
    with pytest.raises(dataclasses.FrozenInstanceError):
        kl.loops = 3


def test_event_logits_are_ordinary_tensors_the_caller_may_change():
    """The model's step runs under inference mode; what the engine hands out is not an inference tensor (an in-place
    change to it would raise outside inference mode)."""
    event = next(iter(Engine(tiny_model(), loops=2).stream([[0, 5, 6]], 1)))
    assert not event.logits.is_inference()
    event.logits[0, 0] = 0.0
