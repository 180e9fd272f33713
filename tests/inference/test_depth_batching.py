"""Depth-level batching (parcae.inference.depth_batching): tokens at different loop iterations share one recurrent
call, yet every request gets exactly what :meth:`Engine.stream` gives it alone — tokens, depths, log-probabilities —
under forced mixed depths with every KV policy, with requests joining and leaving mid-stream; and no token reads
another request's or an unreached iteration's keys/values (poisoned entries). Tiny random models, CPU fp32."""

import math

import pytest
import torch

from conftest import perturb_weights
from parcae.inference import Engine, Sampling
from parcae.inference.depth_batching import DepthBatch, generate
from parcae.inference.engine import row_generators
from parcae.inference.exits import ForcedDepth, ScriptedDepth
from parcae.inference.options import DepthOptions
from parcae.inference.scheduler import Job, Scheduler
from parcae.model import LoopedLM, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

T = 6  # max_loops
PROMPTS = [[0, 5, 9], [0, 17, 4, 33, 8], [0], [0, 2, 2, 7, 1, 3, 3]]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    cfg = ModelConfig(name="tiny", vocab_size=96, block_size=64, d_model=32, n_heads=2, d_ff=64, n_prelude=1,
                      n_recurrent=2, n_coda=1, mean_recurrence=4, backprop_depth=2)
    return perturb_weights(LoopedLM(cfg)).eval()


def alone(engine, prompt, n, sampling=Sampling()):
    """Engine.stream of one request alone: tokens, depths, and each token's log-probability under the model."""
    tokens, depths, logprobs = [], [], []
    for ev in engine.stream([prompt], n, sampling):
        tokens.append(ev.tokens[0])
        depths.append(ev.depths[0])
        logp = torch.log_softmax(ev.logits[0, : engine.config.vocab_size], -1)
        logprobs.append(float(logp[ev.tokens[0]]))
    return tokens, depths, logprobs


@pytest.mark.parametrize("policy", ["full", "latest", "ring:2"])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=1.0, seed=5)], ids=["greedy", "sampled"])
def test_generate_equals_each_request_alone_under_forced_mixed_depths(model, policy, sampling):
    engine = Engine(model, exit=ScriptedDepth.spread(T), max_loops=T, kv_policy=policy)
    got = generate(engine, PROMPTS, 8, sampling)
    for prompt, g in zip(PROMPTS, got):
        tokens, depths, _ = alone(engine, prompt, 8, sampling)
        assert (g.tokens, g.depths) == (tokens, depths)
    assert len({d for g in got for d in g.depths}) >= 4   # the depths really are mixed
    assert engine.generate(PROMPTS, 8, sampling) == got     # (token-level steps on the CPU: default_gather)


@pytest.mark.parametrize("options", [
    dict(exit="latent-diff:0.3", min_loops=2, exit_every=2),
    dict(exit="kl:0.05", continuous=True),
    dict(exit=ScriptedDepth.spread(T, needs_logits=True), kv_policy="ring:3", continuous=True),
    dict(loops=3),
], ids=["state-rule-min-every", "kl-warm", "output-rule-ring-warm", "fixed"])
def test_rules_bounds_warm_start_and_fixed_depth_equal_alone(model, options):
    engine = Engine(model, **({"max_loops": T} if "exit" in options else {}), **options)
    got = generate(engine, PROMPTS, 6)
    for prompt, g in zip(PROMPTS, got):
        tokens, depths, _ = alone(engine, prompt, 6)
        assert (g.tokens, g.depths) == (tokens, depths)


def run(scheduler, events, limit=2000):
    for _ in range(limit):
        if all(ev and ev[-1].finish for ev in events):
            return
        scheduler.step()
    raise AssertionError("the scheduler did not finish")


@pytest.mark.parametrize("policy", ["full", "latest", "ring:2"])
def test_scheduler_requests_join_and_leave_mid_stream(model, policy):
    """Two slots for five requests of different lengths, submitted over time: rows leave at their own token, new
    ones take their slots while the other row is mid-loop; each equals its request alone, log-probabilities too."""
    depth = DepthOptions(exit=ScriptedDepth.spread(T), max_loops=T, kv_policy=policy)
    scheduler = Scheduler(model, max_rows=2, depth_gather=1)
    jobs = [Job(PROMPTS[i % 4], max_new_tokens=3 + 2 * i, depth=depth,
                sampling=Sampling(temperature=0.0 if i % 2 else 0.9), seed=i, logprobs=2) for i in range(5)]
    events = [[] for _ in jobs]
    scheduler.submit(jobs[0], events[0].append)
    for _ in range(3):
        scheduler.step()
    for i in range(1, 5):
        scheduler.submit(jobs[i], events[i].append)
        scheduler.step()
    lanes = []
    for _ in range(2000):
        if all(ev and ev[-1].finish for ev in events):
            break
        lanes += [lane for lane in scheduler._lanes.values() if lane not in lanes]
        scheduler.step()
    assert lanes and all(lane.depth is not None for lane in lanes)   # decoded in depth-level ticks
    for job, evs in zip(jobs, events):
        sampling = Sampling(job.sampling.temperature, seed=job.seed)
        tokens, depths, logprobs = alone(Engine.from_options(model, job.depth), job.prompt, job.max_new_tokens,
                                         sampling)
        assert [e.token for e in evs] == tokens and [e.depth for e in evs] == depths
        assert [e.logprob for e in evs] == pytest.approx(logprobs, abs=1e-5)
        assert evs[-1].finish == "length"


def _poison(cache, idle):
    """NaN into every entry no token may read: all of an idle slot's, and in the rows in use each recurrent slot
    a column's token never computed (iterations >= its count; ring:K: slots >= min(count, K))."""
    for store in [*cache.stores.values(), *cache.recurrent]:
        for row in idle:
            store.k[:, row], store.v[:, row] = math.nan, math.nan
    K = cache.policy.slots if cache.policy.kind == "ring" else None
    valid = cache.computed if K is None else cache.computed.clamp(max=K)                # [B, capacity]
    for store in cache.recurrent:
        slots = torch.arange(store.slots)[:, None, None]
        bad = (slots >= valid[None]) & cache.present[None]                             # [slots, B, capacity]
        store.k.masked_fill_(bad[:, :, None, :, None], math.nan)
        store.v.masked_fill_(bad[:, :, None, :, None], math.nan)


@pytest.mark.parametrize("policy", ["latest", "ring:2"])
def test_no_token_reads_another_request_or_an_unreached_iteration(model, policy):
    """Between ticks every entry that must not be read is NaN (an idle slot's; iterations a token never reached):
    any such read would turn the reader's output to NaN and its tokens away from the request alone."""
    engine = Engine(model, exit=ScriptedDepth.spread(T), max_loops=T, kv_policy=policy)
    prompts = PROMPTS[:3]
    start = engine.start(prompts + [[0, 1]], 8)   # row 3 is laid out but never decodes: an idle slot
    batch = DepthBatch(engine, start.cache, start.seq_ids)
    samplings = [Sampling(temperature=1.0, seed=2)] * 4
    generators = row_generators(samplings, start.sequences, engine.device)
    first = start.tokens[:, 0].tolist()
    out = [[] for _ in prompts]
    for b in range(3):
        batch.admit(b, samplings[b], generators[b], logprobs=0)
        batch.enter(b, first[b], start.cols[b], start.positions[b])
    while batch.active:
        _poison(start.cache, idle=[3])
        for x in batch.tick():
            assert math.isfinite(x.logprobs.chosen)
            out[x.slot].append((x.token, x.depth))
            if len(out[x.slot]) < 8:
                batch.enter(x.slot, x.token, batch.col[x.slot] + 1, batch.pos[x.slot] + 1)
    for prompt, o in zip(prompts, out):
        tokens, depths, _ = alone(engine, prompt, 8, samplings[0])
        assert o == list(zip(tokens, depths))


def test_tokens_at_different_iterations_share_one_call(model):
    """The point of it: a tick runs every token in flight, so the ticks are about the deepest request's total
    depth, not the sum of every step's deepest token (what token-level steps run)."""
    engine = Engine(model, exit=ScriptedDepth.spread(T), max_loops=T)
    start = engine.start(PROMPTS, 8)
    before = engine.iterations_run
    batch = DepthBatch(engine, start.cache, start.seq_ids)
    generators = row_generators([Sampling()] * 4, start.sequences, engine.device)
    depths = [[] for _ in PROMPTS]
    for b, token in enumerate(start.tokens[:, 0].tolist()):
        batch.admit(b, Sampling(), generators[b])
        batch.enter(b, token, start.cols[b], start.positions[b])
    while batch.active:
        for x in batch.tick():
            depths[x.slot].append(x.depth)
            if len(depths[x.slot]) < 8:
                batch.enter(x.slot, x.token, batch.col[x.slot] + 1, batch.pos[x.slot] + 1)
    token_level = sum(max(d[i] for d in depths) for i in range(8))
    assert batch.ticks == max(sum(d) for d in depths) < token_level
    assert engine.iterations_run - before == sum(map(sum, depths))   # under latest a token computes its depth


def test_a_rule_without_per_token_restart_is_refused_and_generate_falls_back(model):
    engine = Engine(model, exit=ForcedDepth(lambda n, r: 1 + r), max_loops=T)
    with pytest.raises(ValueError, match="cannot run depth-level"):
        DepthBatch(engine, engine.new_cache(2, 16), torch.zeros(2, dtype=torch.long))
    assert [g.depths for g in engine.generate(PROMPTS[:2], 2)] == [[1, 1], [2, 2]]   # token-level steps


@pytest.mark.parametrize("policy", ["full", "latest"])
def test_gathered_read_outs_change_nothing(model, policy):
    """Exited tokens that wait for `gather` others before their read-out (and their successors) get the same
    tokens and depths as the request alone."""
    engine = Engine(model, exit=ScriptedDepth.spread(T, needs_logits=policy == "full"), max_loops=T, kv_policy=policy)
    sampling = Sampling(temperature=1.0, seed=1)
    got = generate(engine, PROMPTS, 6, sampling, gather=3)
    for prompt, g in zip(PROMPTS, got):
        tokens, depths, _ = alone(engine, prompt, 6, sampling)
        assert (g.tokens, g.depths) == (tokens, depths)


def test_scheduler_gather_and_cancel_mid_loop(model):
    """depth_gather=3 in the scheduler, one request cancelled while the others loop: the rest equal alone; 0
    decodes the lane in token-level steps (no depth-level batch)."""
    depth = DepthOptions(exit=ScriptedDepth.spread(T), max_loops=T)
    scheduler = Scheduler(model, max_rows=4, depth_gather=3)
    jobs = [Job(p, max_new_tokens=6, depth=depth, logprobs=0) for p in PROMPTS]
    events = [[] for _ in jobs]
    tickets = [scheduler.submit(j, events[i].append) for i, j in enumerate(jobs)]
    for _ in range(7):
        scheduler.step()
    scheduler.cancel(tickets[1])
    run(scheduler, events)
    assert events[1][-1].finish == "cancelled"
    for i in (0, 2, 3):
        tokens, depths, logprobs = alone(Engine.from_options(model, jobs[i].depth), jobs[i].prompt, 6)
        assert [e.token for e in events[i]] == tokens and [e.depth for e in events[i]] == depths
        assert [e.logprob for e in events[i]] == pytest.approx(logprobs, abs=1e-5)
    for gather, depth_level in ((0, False), (None, False), (2, True)):   # None: default_gather, 0 on the CPU
        other = Scheduler(model, max_rows=2, depth_gather=gather)
        other.submit(jobs[0], lambda ev: None)
        other.step()
        assert (next(iter(other._lanes.values())).depth is not None) == depth_level
    with pytest.raises(ValueError, match="depth_gather"):
        Scheduler(model, depth_gather=-1)


def test_scheduler_warm_start_and_chunked_prefill(model):
    """Warm start (each token starts from its predecessor's exit state) and prompts prefilled in chunks, in a
    depth-level lane: each request equals its request alone."""
    depth = DepthOptions(exit="latent-diff:0.2", max_loops=T, continuous=True)
    scheduler = Scheduler(model, max_rows=3, depth_gather=1, prefill_chunk=2)
    prompts = [[0], [0, 3, 1, 4, 1, 5, 9], PROMPTS[1]]
    jobs = [Job(p, max_new_tokens=5, depth=depth, logprobs=0) for p in prompts]
    events = [[] for _ in jobs]
    for i, job in enumerate(jobs):
        scheduler.submit(job, events[i].append)
    run(scheduler, events)
    for job, evs in zip(jobs, events):
        tokens, depths, logprobs = alone(Engine.from_options(model, job.depth), job.prompt, 5)
        assert [e.token for e in evs] == tokens and [e.depth for e in evs] == depths
        assert [e.logprob for e in evs] == pytest.approx(logprobs, abs=1e-5)
