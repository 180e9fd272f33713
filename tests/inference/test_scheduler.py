"""The continuous-batching scheduler, stepped by hand: rows that join, leave, queue, reuse slots, prefill in chunks
and get cancelled each produce exactly what the engine produces for that request alone."""

import pytest
import torch

from conftest import perturb_weights
from parcae.inference import Engine, Sampling
from parcae.inference.options import DepthOptions
from parcae.inference.scheduler import Job, Overloaded, Scheduler
from parcae.model import LoopedLM

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    from parcae.model import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(name="tiny", vocab_size=128, block_size=32, d_model=32, n_heads=2, d_ff=64, n_prelude=1,
                      n_recurrent=1, n_coda=1, mean_recurrence=3, backprop_depth=2)
    return perturb_weights(LoopedLM(cfg)).eval()


def alone(model, job: Job, stop_ids=()):
    sampling = Sampling(job.sampling.temperature, job.sampling.top_k, job.sampling.top_p, seed=job.seed)
    out = Engine.from_options(model, job.depth).generate([job.prompt], job.max_new_tokens, sampling, stop_ids)[0]
    return out.tokens, out.depths


def collect(events, i):
    return lambda ev: events[i].append(ev)


def run_until_done(scheduler, events, n, limit=500):
    for _ in range(limit):
        if all(ev and ev[-1].finish for ev in events[:n]):
            return
        scheduler.step()
    raise AssertionError(f"not finished after {limit} steps: {scheduler.stats()}")


JOBS = [  # prompt, new tokens, depth options, sampling, seed
    ([1, 5, 9, 13, 2, 7, 40, 41, 42, 43], 9, DepthOptions(), Sampling(), 0),
    ([1, 3], 3, DepthOptions(loops=2), Sampling(), 0),
    ([1], 5, DepthOptions(), Sampling(temperature=1.0, top_k=20), 2**45),
    ([1, 8, 8, 8, 9], 6, DepthOptions(exit="latent-diff:0.3", max_loops=5, kv_policy="latest"), Sampling(), 0),
    ([1, 60, 61, 62, 63, 64, 65], 4, DepthOptions(continuous=True), Sampling(), 0),
    ([1, 70, 71], 7, DepthOptions(), Sampling(temperature=0.7, top_p=0.9), 12345),
]


def test_rows_that_join_leave_and_reuse_slots_equal_the_request_alone(model):
    """Two slots for six requests with different depth options: requests queue, join as rows finish, reuse the
    freed slots (release), prefill in chunks of 3 tokens; each answer equals the engine's for it alone."""
    scheduler = Scheduler(model, max_rows=2, prefill_chunk=3)
    jobs = [Job(list(p), n, d, s, seed) for p, n, d, s, seed in JOBS]
    events = [[] for _ in jobs]
    scheduler.submit(jobs[0], collect(events, 0))
    for _ in range(3):   # the long request is running when the others arrive
        scheduler.step()
    for i in range(1, len(jobs)):
        scheduler.submit(jobs[i], collect(events, i))
    assert scheduler.stats()["queued"] == len(jobs) - 1
    run_until_done(scheduler, events, len(jobs))
    for job, ev in zip(jobs, events):
        tokens, depths = alone(model, job)
        assert [e.token for e in ev] == tokens and [e.depth for e in ev] == depths
        assert [e.finish for e in ev] == [None] * (len(tokens) - 1) + ["length"]
    stats = scheduler.stats()
    assert stats["finished"] == len(jobs) and stats["active"] == 0 and stats["lanes"] == 0


def test_short_request_finishes_while_a_long_one_runs_and_stop_ids_end_a_row(model):
    scheduler = Scheduler(model, max_rows=4)
    long_job, short_job = Job([1, 2, 3], 25), Job([1, 4], 2)
    events = [[], []]
    scheduler.submit(long_job, collect(events, 0))
    scheduler.step()
    scheduler.submit(short_job, collect(events, 1))
    scheduler.step()
    scheduler.step()
    assert events[1][-1].finish == "length" and len(events[0]) == 3 and events[0][-1].finish is None
    run_until_done(scheduler, events, 2)
    # a stop id ends the row at that token: take the 4th greedy token of the long request as the stop id
    stop = alone(model, long_job)[0][3]
    s2 = Scheduler(model, stop_ids=[stop])
    got = []
    s2.submit(long_job, got.append)
    run_until_done(s2, [got], 1)
    expected = alone(model, long_job, stop_ids=[stop])[0]
    assert [e.token for e in got] == expected and got[-1].finish == "stop" and got[-1].token == stop


def test_cancelled_rows_leave_and_free_their_slot(model):
    scheduler = Scheduler(model, max_rows=1)
    events = [[], [], []]
    tickets = [scheduler.submit(Job([1, 2, 3], 20), collect(events, 0)),
               scheduler.submit(Job([1, 9], 20), collect(events, 1)),
               scheduler.submit(Job([1, 5, 6], 4), collect(events, 2))]
    scheduler.step()
    scheduler.step()
    scheduler.cancel(tickets[0])   # running
    scheduler.cancel(tickets[1])   # still queued
    run_until_done(scheduler, events, 3)
    assert events[0][-1].finish == "cancelled" and len(events[0]) == 3
    assert [e.finish for e in events[1]] == ["cancelled"]
    assert [e.token for e in events[2]] == alone(model, Job([1, 5, 6], 4))[0]
    assert scheduler.stats()["cancelled"] == 2 and scheduler.stats()["finished"] == 1


def test_logprobs_are_the_models_log_softmax(model):
    scheduler = Scheduler(model)
    got = []
    job = Job([1, 2, 3], 3, logprobs=4)
    scheduler.submit(job, got.append)
    run_until_done(scheduler, [got], 1)
    ids = list(job.prompt)
    with torch.no_grad():
        for ev in got:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1, :128].float(), -1)
            top = torch.topk(logp, 4)
            assert ev.token == int(logp.argmax()) and ev.logprob == pytest.approx(float(logp[ev.token]), abs=1e-4)
            assert [i for i, _ in ev.top] == top.indices.tolist()
            assert [lp for _, lp in ev.top] == pytest.approx(top.values.tolist(), abs=1e-4)
            ids.append(ev.token)
    # logprobs 0: the chosen token's log-probability and an empty top list; None (not asked): neither
    got0, none = [], []
    scheduler.submit(Job([1, 2, 3], 3, logprobs=0), got0.append)
    scheduler.submit(Job([1, 2, 3], 3), none.append)
    run_until_done(scheduler, [got0, none], 2)
    assert [e.token for e in got0] == [e.token for e in got]
    assert [e.logprob for e in got0] == pytest.approx([e.logprob for e in got], abs=1e-6)
    assert all(e.top == [] for e in got0) and all(e.logprob is None and e.top is None for e in none)


class Exploding:
    """An exit rule whose forward raises: a fault inside one lane's forward."""
    name, needs_logits = "exploding", False

    def start(self, h0, vocab_size):
        raise RuntimeError("boom in the forward")


def test_a_failing_lane_fails_only_its_rows(model):
    scheduler = Scheduler(model, max_rows=4)
    events = [[], []]
    scheduler.submit(Job([1, 2], 5, DepthOptions(loops=2)), collect(events, 0))
    scheduler.submit(Job([1, 2], 5, DepthOptions(exit=Exploding(), max_loops=3)), collect(events, 1))
    run_until_done(scheduler, events, 2)
    assert events[1][-1].finish == "error" and "boom in the forward" in events[1][-1].error
    assert [e.token for e in events[0]] == alone(model, Job([1, 2], 5, DepthOptions(loops=2)))[0]


def test_invalid_depth_options_are_refused_at_submit(model):
    with pytest.raises(ValueError, match="unknown exit rule"):
        Scheduler(model).submit(Job([1, 2], 5, DepthOptions(exit="no-such-rule")), print)


def test_equivalent_depth_spellings_share_one_lane(model):
    """kl, kl:1e-3, kl:0.001 and kl:auto, kv_policy omitted or "latest", max_loops omitted or μ_rec: one lane."""
    mu = model.config.mean_recurrence
    spellings = [DepthOptions(exit="kl"), DepthOptions(exit="kl:1e-3", kv_policy="latest"),
                 DepthOptions(exit="kl:0.001", max_loops=mu), DepthOptions(exit=" kl:auto", min_loops=1)]
    resolved = {d.resolved(model.config) for d in spellings}
    assert len(resolved) == 1 and hash(next(iter(resolved))) == hash(spellings[0].resolved(model.config))
    assert DepthOptions(kv_policy="ring:04", loops=2).resolved(model.config) == \
        DepthOptions(kv_policy="ring:4", max_loops=2).resolved(model.config)
    scheduler = Scheduler(model, max_rows=4)
    events = [[] for _ in spellings]
    for i, depth in enumerate(spellings):
        scheduler.submit(Job([1, 2 + i], 6, depth), collect(events, i))
    scheduler.step()
    assert scheduler.stats()["lanes"] == 1 and scheduler.stats()["active"] == 4
    run_until_done(scheduler, events, len(spellings))
    for i, depth in enumerate(spellings):
        assert [e.token for e in events[i]] == alone(model, Job([1, 2 + i], 6, depth))[0]


def test_lanes_are_capped_and_a_job_waiting_for_one_does_not_block_the_others(model):
    """16 requests with 16 distinct thresholds: never more than max_lanes lanes (each holds max_rows full-context
    caches), every answer equals the request alone; a job waiting for a lane lets later jobs of open lanes in."""
    scheduler = Scheduler(model, max_rows=4, max_lanes=2)
    jobs = [Job([1, 3 + i], 4 + i % 3, DepthOptions(exit=f"latent-diff:{0.05 + 0.01 * i:.2f}", max_loops=5))
            for i in range(16)]
    events = [[] for _ in jobs]
    for i, job in enumerate(jobs):
        scheduler.submit(job, collect(events, i))
    lanes = []
    for _ in range(500):
        if all(ev and ev[-1].finish for ev in events):
            break
        scheduler.step()
        lanes.append(scheduler.stats()["lanes"])
    assert max(lanes) == 2
    for job, ev in zip(jobs, events):
        assert [e.token for e in ev] == alone(model, job)[0] and ev[-1].finish == "length"
    # lane a runs two long jobs, lane b one; a third kind waits; a later job of lane a still joins at once, while
    # lane b (the fewest rows) drains so that the waiting job gets a lane when b's job ends
    scheduler = Scheduler(model, max_rows=5, max_lanes=2)
    a, b, c = (DepthOptions(loops=n) for n in (1, 2, 3))
    events = [[] for _ in range(5)]
    scheduler.submit(Job([1, 2], 20, a), collect(events, 0))
    scheduler.submit(Job([1, 3], 20, a), collect(events, 1))
    scheduler.submit(Job([1, 2], 6, b), collect(events, 2))
    scheduler.step()
    scheduler.submit(Job([1, 5], 3, c), collect(events, 3))      # no lane for it yet
    scheduler.submit(Job([1, 7], 3, a), collect(events, 4))      # lane a is open
    scheduler.step()
    assert scheduler.stats()["queued"] == 1 and len(events[4]) == 1 and not events[3]
    run_until_done(scheduler, events, 5)
    assert len(events[3]) == 3 and len(events[0]) == 20
    assert [e.token for e in events[3]] == alone(model, Job([1, 5], 3, c))[0]
    assert len(events[1][0:7]) == 7 and events[3][-1].finish == "length"


def test_the_queue_is_bounded(model):
    scheduler = Scheduler(model, max_rows=1, max_queue=2)
    assert scheduler.max_queue == 2 and Scheduler(model, max_rows=3).max_queue == 12
    events = [[], [], []]
    for i in range(2):
        scheduler.submit(Job([1, 2], 2), collect(events, i))
    with pytest.raises(Overloaded, match="max_queue 2"):
        scheduler.submit(Job([1, 2], 2), collect(events, 2))
    assert scheduler.stats()["refused"] == 1
    scheduler.step()                                  # one is admitted: room in the queue again
    scheduler.submit(Job([1, 2], 2), collect(events, 2))
    run_until_done(scheduler, events, 3)


def test_a_tiny_temperature_beside_a_greedy_row_is_greedy_and_fails_nobody(model):
    scheduler = Scheduler(model, max_rows=4)
    greedy, tiny = Job([1, 2, 3], 8), Job([1, 2, 3], 8, sampling=Sampling(temperature=1e-300), seed=3)
    events = [[], []]
    scheduler.submit(greedy, collect(events, 0))
    scheduler.submit(tiny, collect(events, 1))
    run_until_done(scheduler, events, 2)
    expected = alone(model, greedy)[0]
    assert [e.token for e in events[0]] == expected and [e.token for e in events[1]] == expected
    assert events[1][-1].finish == "length"
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite"):
            Sampling(temperature=bad)
    with pytest.raises(ValueError, match="finite"):
        Sampling(temperature=1.0, top_p=float("nan"))


def test_a_row_whose_sampling_fails_fails_alone(model, monkeypatch):
    import parcae.inference.engine as engine_module

    real = engine_module.sampling_probs

    def faulty(logits, sampling, vocab_size):
        if sampling.temperature == 0.5:
            raise RuntimeError("injected sampling fault")
        return real(logits, vocab_size=vocab_size, sampling=sampling)

    monkeypatch.setattr(engine_module, "sampling_probs", faulty)
    scheduler = Scheduler(model, max_rows=4)
    jobs = [Job([1, 2, 3], 6), Job([1, 4], 6, sampling=Sampling(temperature=0.5), seed=1),
            Job([1, 5], 6, sampling=Sampling(temperature=0.9), seed=2)]
    events = [[] for _ in jobs]
    for i, job in enumerate(jobs):
        scheduler.submit(job, collect(events, i))
    run_until_done(scheduler, events, 3)
    assert [e.finish for e in events[1]] == ["error"] and "injected sampling fault" in events[1][0].error
    monkeypatch.setattr(engine_module, "sampling_probs", real)
    for i in (0, 2):
        assert [e.token for e in events[i]] == alone(model, jobs[i])[0] and events[i][-1].finish == "length"
    assert scheduler.stats()["failed"] == 1 and scheduler.stats()["finished"] == 2


def test_a_reused_slot_forgets_its_previous_row_under_the_latest_policy(model):
    """`latest` reads a token's last computed iteration where a later one is missing: a slot reused after a long
    prompt (prefilled at every iteration) must not hand the new row the old row's deeper entries."""
    depth = DepthOptions(exit="latent-diff:0.05", max_loops=6, kv_policy="latest")
    keeper, old, new = Job([1, 3, 4], 20, depth), Job([1, *range(10, 22)], 1, depth), Job([1, 2], 8, depth)
    scheduler = Scheduler(model, max_rows=2)
    events = [[], [], []]
    for i, job in enumerate((keeper, old, new)):
        scheduler.submit(job, collect(events, i))
    run_until_done(scheduler, events, 3)
    tokens, depths = alone(model, new)
    # the case that needs the fallback: a token runs deeper than an earlier one, whose missing iteration it reads
    assert any(depths[i] < max(depths[i + 1:]) for i in range(len(depths) - 1))
    assert [e.token for e in events[2]] == tokens and [e.depth for e in events[2]] == depths


def test_the_thread_runs_jobs_and_close_cancels_what_is_left(model):
    import queue

    scheduler = Scheduler(model, max_rows=1).start()
    done, left = queue.Queue(), queue.Queue()
    scheduler.submit(Job([1, 2], 3), done.put)
    got = [done.get(timeout=60) for _ in range(3)]
    assert [e.token for e in got] == alone(model, Job([1, 2], 3))[0] and got[-1].finish == "length"
    scheduler.submit(Job([1, 2], 25), left.put)
    assert left.get(timeout=60).finish is None   # running
    scheduler.close()
    events = []
    while not left.empty():
        events.append(left.get())
    assert events[-1].finish == "cancelled" and not scheduler.running
