"""The continuous-batching scheduler, stepped by hand: rows that join, leave, queue, reuse slots, prefill in chunks
and get cancelled each produce exactly what the engine produces for that request alone."""

import pytest
import torch

from conftest import perturb_weights
from parcae.inference import Engine, Sampling
from parcae.inference.scheduler import Job, Scheduler
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
    out = Engine(model, **job.depth).generate([job.prompt], job.max_new_tokens, sampling, stop_ids)[0]
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
    ([1, 5, 9, 13, 2, 7, 40, 41, 42, 43], 9, {}, Sampling(), 0),
    ([1, 3], 3, {"loops": 2}, Sampling(), 0),
    ([1], 5, {}, Sampling(temperature=1.0, top_k=20), 2**45),
    ([1, 8, 8, 8, 9], 6, {"exit": "latent-diff:0.3", "max_loops": 5, "kv_policy": "latest"}, Sampling(), 0),
    ([1, 60, 61, 62, 63, 64, 65], 4, {"continuous": True}, Sampling(), 0),
    ([1, 70, 71], 7, {}, Sampling(temperature=0.7, top_p=0.9), 12345),
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


def test_a_failing_lane_fails_only_its_rows(model):
    scheduler = Scheduler(model, max_rows=4)
    events = [[], []]
    scheduler.submit(Job([1, 2], 5, {"loops": 2}), collect(events, 0))
    scheduler.submit(Job([1, 2], 5, {"exit": "no-such-rule"}), collect(events, 1))  # unvalidated: fails alone
    run_until_done(scheduler, events, 2)
    assert events[1][-1].finish == "error" and "no-such-rule" in events[1][-1].error
    assert [e.token for e in events[0]] == alone(model, Job([1, 2], 5, {"loops": 2}))[0]


def test_a_reused_slot_forgets_its_previous_row_under_the_latest_policy(model):
    """`latest` reads a token's last computed iteration where a later one is missing: a slot reused after a long
    prompt (prefilled at every iteration) must not hand the new row the old row's deeper entries."""
    depth = {"exit": "latent-diff:0.05", "max_loops": 6, "kv_policy": "latest"}
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
