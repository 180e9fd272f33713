"""The compiled decode step (``Engine(..., compile=True)``) against the eager engine and the model's full forward:
compiled = eager (greedy tokens equal, logits within 1e-4), batched = alone, cached = full forward, at fixed depth,
with exit rules and with each KV policy; a recompile is logged; the compile cache lands in its folder.

Compiling with inductor costs seconds to tens of seconds per graph on a CPU, so the module shares one tiny model,
one inductor cache folder (``compile_cache``) and one inductor graph among the fast tests (fixed depth, one row);
the other fast tests trace their graphs with the ``aot_eager`` backend (``PARCAE_COMPILE_BACKEND``: the same
dynamo graph, static shapes and buckets, without inductor's code generation), and their inductor versions are
marked slow."""

import logging

import pytest
import torch

from conftest import perturb_weights
from parcae.inference import Engine
from parcae.inference.compiled import StaticKVCache, cache_dir, capacity_bucket, recompiles, row_bucket
from parcae.model import LoopedLM, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[0, 17, 4, 33, 8], [0, 5, 61]]
NEW = 12
TOL = 1e-4


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """One inductor cache folder for the module (compiled artifacts are shared between its graphs)."""
    mp = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("inductor")
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder))
    yield folder
    mp.undo()


@pytest.fixture(scope="module")
def model():
    cfg = ModelConfig(name="tiny-compiled", vocab_size=96, block_size=64, d_model=32, n_heads=2, n_kv_heads=1,
                      d_ff=64, n_prelude=1, n_recurrent=1, n_coda=1, mean_recurrence=3, backprop_depth=2)
    torch.manual_seed(0)
    return perturb_weights(LoopedLM(cfg).eval())


@pytest.fixture
def traced(monkeypatch):
    """Graphs compiled from here on use the aot_eager backend (see the module docstring)."""
    monkeypatch.setenv("PARCAE_COMPILE_BACKEND", "aot_eager")


@pytest.fixture(scope="module")
def fixed(model, compile_cache):
    """(eager, compiled) engines at the fixed depth 3; the compiled one keeps its graphs for the module."""
    return Engine(model, loops=3), Engine(model, loops=3, compile=True)


def run(engine, prompts):
    events = list(engine.stream(prompts, NEW))
    tokens = [[e.tokens[b] for e in events if e.active[b]] for b in range(len(prompts))]
    logits = torch.stack([e.logits for e in events])                               # [steps, B, V]
    return tokens, logits, [[e.depths[b] for e in events if e.active[b]] for b in range(len(prompts))]


def test_buckets():
    assert [row_bucket(n) for n in (1, 2, 3, 5, 8, 9, 64, 65, 130)] == [1, 2, 4, 8, 8, 16, 64, 128, 192]
    assert [capacity_bucket(n, 256) for n in (1, 64, 65, 200, 256, 300)] == [64, 64, 128, 256, 256, 300]
    assert capacity_bucket(100, 96) == 100  # beyond the context: exactly what is needed


def test_exit_mode_defaults_follow_the_cost_of_an_iteration(model):
    """Compaction (segments) where an iteration costs more than a graph call: the parcae-140m shape (28 MFLOP a token
    per iteration) on the CPU; one graph for the tiny and demo models and under CUDA graphs."""
    from parcae.inference.compiled import default_exit_mode
    from parcae.model import preset

    assert default_exit_mode(preset("parcae-140m"), torch.device("cpu")) == "segments"
    assert default_exit_mode(preset("mini-demo"), torch.device("cpu")) == "graph"
    assert default_exit_mode(model.config, "cpu") == "graph"
    assert default_exit_mode(preset("parcae-140m"), torch.device("cuda")) == "graph"


def test_a_compiled_engine_decodes_token_level_steps(model):
    """Depth-level ticks need per-row iteration slots the static cache does not have: a compiled engine's several
    prompts (and a compiled server lane) decode token-level steps, on an accelerator too (where depth-level ticks are
    the default otherwise)."""
    from parcae.inference.depth_batching import supports

    assert supports(Engine(model, exit="latent-diff"))
    assert not supports(Engine(model, exit="latent-diff", compile=True))


def test_an_unknown_exit_mode_is_refused(model, monkeypatch):
    monkeypatch.setenv("PARCAE_COMPILE_EXIT", "fast")
    with pytest.raises(ValueError, match="PARCAE_COMPILE_EXIT='fast': choose one of segments, graph, eager"):
        Engine(model, exit="latent-diff", compile=True)


def test_compiled_equals_eager_and_the_full_forward(model, fixed):
    eager, compiled = fixed
    prompt = PROMPTS[0]
    tokens_e, logits_e, _ = run(eager, [prompt])
    tokens_c, logits_c, depths = run(compiled, [prompt])
    assert tokens_c == tokens_e
    assert (logits_c - logits_e).abs().max().item() <= TOL
    assert depths == [[3] * NEW]
    with torch.no_grad():  # cached = full forward, through the compiled step
        full = model(torch.tensor([prompt + tokens_c[0]]), loops=3).logits[0]
    assert (logits_c[:, 0] - full[len(prompt) - 1: -1]).abs().max().item() <= TOL
    assert isinstance(compiled.new_cache(1, 20), StaticKVCache)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_batched_equals_alone(model, compile_cache, monkeypatch, backend):
    monkeypatch.setenv("PARCAE_COMPILE_BACKEND", backend)
    compiled = Engine(model, loops=3, compile=True)
    alone = [run(compiled, [p]) for p in PROMPTS]
    before = recompiles()
    for padding in ("left", "right"):
        tokens, logits, _ = run(compiled, PROMPTS) if padding == "left" else \
            (lambda ev: ([[e.tokens[b] for e in ev] for b in range(2)], torch.stack([e.logits for e in ev]), None))(
                list(compiled.stream(PROMPTS, NEW, padding="right")))
        for b, (tokens_a, logits_a, _) in enumerate(alone):
            assert tokens[b] == tokens_a[0]
            assert (logits[:, b] - logits_a[:, 0]).abs().max().item() <= TOL
    assert recompiles() == before  # a second bucket is a graph of its own, not a recompile


def test_exit_rule_under_full_is_one_graph_and_equals_eager(model, compile_cache, traced):
    eager = Engine(model, exit="latent-diff:1", max_loops=4, kv_policy="full")
    compiled = Engine(model, exit="latent-diff:1", max_loops=4, kv_policy="full", compile=True)
    tokens_e, logits_e, depths_e = run(eager, PROMPTS)
    tokens_c, logits_c, depths_c = run(compiled, PROMPTS)
    assert tokens_c == tokens_e and depths_c == depths_e
    assert len(set(d for row in depths_e for d in row)) > 1  # the rule did exit at different depths
    assert (logits_c - logits_e).abs().max().item() <= TOL
    assert compiled.iterations_run == eager.iterations_run


@pytest.mark.parametrize("policy,mode,backend", [
    ("latest", "segments", "aot_eager"), ("latest", "graph", "aot_eager"), ("ring:2", "segments", "aot_eager"),
    ("ring:2", "graph", "aot_eager"), pytest.param("latest", "segments", "inductor", marks=pytest.mark.slow)])
def test_exit_rules_under_latest_and_ring_equal_eager(model, compile_cache, monkeypatch, policy, mode, backend):
    """latest / ring, both ways a compiled engine runs them (segments between checks on the rows still deciding;
    one graph in which a row whose token exited keeps running without storing): the tokens, depths, logits and KV
    fallbacks equal the eager exit schedule's, which drops such rows."""
    monkeypatch.setenv("PARCAE_COMPILE_BACKEND", backend)
    monkeypatch.setenv("PARCAE_COMPILE_EXIT", mode)
    eager = Engine(model, exit="latent-diff:1", max_loops=4, kv_policy=policy)
    compiled = Engine(model, exit="latent-diff:1", max_loops=4, kv_policy=policy, compile=True)
    tokens_e, logits_e, depths_e = run(eager, PROMPTS)
    before = recompiles()
    tokens_c, logits_c, depths_c = run(compiled, PROMPTS)
    assert tokens_c == tokens_e and depths_c == depths_e
    assert len(set(d for row in depths_e for d in row)) > 1
    assert (logits_c - logits_e).abs().max().item() <= TOL
    assert compiled.iterations_run == eager.iterations_run
    assert compiled.iterations_run < eager.max_loops * 2 * NEW  # the tokens' depths, not max_loops each
    assert recompiles() == before


@pytest.mark.parametrize("policy,options", [("latest", dict()),
                                            ("ring:3", dict(exit_every=2, min_loops=2, continuous=True))])
def test_compiled_segments_compact_rows_to_buckets_and_equal_eager(model, compile_cache, traced, monkeypatch,
                                                                  policy, options):
    """Mixed depths 1..5 over 4 rows (ScriptedDepth): after each check the rows still deciding go on in a smaller row
    bucket (4, then 2 or 1), so the graphs compute fewer (row, iteration) pairs than one graph of all rows; every
    token, depth and logit is the eager engine's and no graph is compiled twice."""
    from parcae.inference.exits import ScriptedDepth

    from torch._dynamo.utils import counters

    monkeypatch.setenv("PARCAE_COMPILE_EXIT", "segments")
    prompts = PROMPTS + [[0, 9], [0, 1, 2, 3, 4, 5, 6]]
    depth = dict(exit=ScriptedDepth.spread(5), max_loops=5, kv_policy=policy, **options)
    eager, compiled = Engine(model, **depth), Engine(model, compile=True, **depth)
    tokens_e, logits_e, depths_e = run(eager, prompts)
    before = recompiles()
    counters.clear()
    alone = run(compiled, prompts[:1])  # a batch of 1 (its 1-row segments are other graphs than a batch of 4's)
    ran_alone = compiled.compiled.row_iterations
    tokens_c, logits_c, depths_c = run(compiled, prompts)
    assert tokens_c == tokens_e and depths_c == depths_e and alone[0][0] == tokens_e[0]
    assert (logits_c - logits_e).abs().max().item() <= TOL
    assert recompiles() == before and not counters["graph_break"]  # whole graphs, each compiled once
    buckets = {key[1] for key in compiled.compiled._graphs if key[0] == "segment"}
    assert 4 in buckets and buckets & {1, 2}, buckets  # compaction ran the later segments on fewer rows
    one_graph = 4 * 5 * NEW  # all 4 rows, max_loops each, every step
    decoded = sum(d for row in depths_c for d in row)  # the generated tokens' iterations (the prompts' run eagerly)
    assert decoded <= compiled.compiled.row_iterations - ran_alone < one_graph


@pytest.mark.parametrize("rule", ["latent-diff:1", "cosine:0.05", "kl:0.05", "minp-kl:0.05", "entropy-diff:0.05",
                                  "argmax-stability:2"])
def test_each_exit_rule_compiled_equals_eager(model, compile_cache, traced, rule):
    """Each rule traced into the one-graph step of the full policy (aot_eager: the same dynamo graph; inductor's
    code for an exit rule is checked by the inductor case of the latest/ring test)."""
    eager = Engine(model, exit=rule, max_loops=4, kv_policy="full")
    compiled = Engine(model, exit=rule, max_loops=4, kv_policy="full", compile=True)
    tokens_e, logits_e, depths_e = run(eager, PROMPTS)
    tokens_c, logits_c, depths_c = run(compiled, PROMPTS)
    assert tokens_c == tokens_e and depths_c == depths_e
    assert (logits_c - logits_e).abs().max().item() <= TOL


def test_ring_policy_at_fixed_depth_compiled_equals_eager(model, compile_cache, traced):
    eager, compiled = Engine(model, loops=3, kv_policy="ring:2"), Engine(model, loops=3, kv_policy="ring:2", compile=True)
    tokens_e, logits_e, _ = run(eager, PROMPTS)
    tokens_c, logits_c, _ = run(compiled, PROMPTS)
    assert tokens_c == tokens_e
    assert (logits_c - logits_e).abs().max().item() <= TOL


def test_the_compile_cache_folder_is_used(fixed, compile_cache):
    _, compiled = fixed
    run(compiled, PROMPTS[:1])
    assert cache_dir() == compile_cache
    assert any(compile_cache.glob("fxgraph/**/*")), "inductor wrote no compiled graph to the cache folder"


def test_cache_folder_defaults_to_parcaes(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache/parcae/inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"  # the user's choice stands


@pytest.mark.skipif(__import__("platform").machine() not in ("x86_64", "AMD64"), reason="x86 vector ISA checks")
def test_the_vector_isa_check_runs_once_per_machine(monkeypatch, tmp_path):
    """Inductor's per-process check of the CPU's vector instruction sets (child processes, ~1.4 s of a compiled
    start) runs until it passes once; then a marker in the cache folder lets every process set inductor's switch
    instead. A check that fails for one instruction set writes no marker and sets nothing."""
    from torch._inductor import config, cpu_vec_isa
    from parcae.inference.compiled import _reuse_vector_isa_probe

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(cpu_vec_isa, "x86_isa_checker", lambda: ["avx2", "avx512"])
    reported = [isa for isa in cpu_vec_isa.supported_vec_isa_list if str(isa) in ("avx2", "avx512")]
    checks = []
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: checks.append(1) or reported[1:])  # avx512 fails
    with config.patch({"cpp.vec_isa_ok": None}):  # (inductor's own way to set its options for a while)
        _reuse_vector_isa_probe()
        assert config.cpp.vec_isa_ok is None and not list(tmp_path.glob("vector-isa-*")) and len(checks) == 1
    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", lambda: checks.append(1) or reported)  # both pass
    for process in range(3):
        with config.patch({"cpp.vec_isa_ok": None}):
            _reuse_vector_isa_probe()
            assert config.cpp.vec_isa_ok is True
    assert len(checks) == 2 and len(list(tmp_path.glob("vector-isa-*.ok"))) == 1  # checked once more, then trusted


def test_a_recompile_is_logged(fixed, caplog):
    """Any graph dynamo compiles again (a failed guard) is a warning on the parcae.compile logger."""
    fixed[1]  # the compiled engine installed the hook
    f = torch.compile(lambda x: x * 2 + 1, dynamic=False)
    with caplog.at_level(logging.WARNING, logger="parcae.compile"):
        f(torch.ones(3))
        before = recompiles()
        f(torch.ones(5))  # another shape under dynamic=False: a recompile
    assert recompiles() == before + 1
    assert any("recompiled" in r.getMessage() for r in caplog.records if r.name == "parcae.compile")


def test_scheduler_lanes_compiled_equal_each_request_alone(model, compile_cache, traced, monkeypatch, caplog):
    """The server's scheduler with compile=True (rows joining, leaving and reusing slots of a lane's static cache,
    chunked prefill, a warm-start lane, an exit-rule lane) answers each request as the eager engine does alone."""
    from parcae.inference import Sampling
    from parcae.inference.options import DepthOptions
    from parcae.inference.scheduler import Job, Scheduler

    jobs = [Job([0, 5, 9, 13, 2, 7, 40], 9, DepthOptions(), Sampling(), 0),
            Job([0, 3], 5, DepthOptions(), Sampling(temperature=1.0, top_k=20), 7),
            Job([0, 8, 8, 9], 6, DepthOptions(exit="latent-diff:1", max_loops=4), Sampling(), 0),
            Job([0, 60, 61, 62], 4, DepthOptions(continuous=True), Sampling(), 0),
            Job([0, 70, 71], 7, DepthOptions(), Sampling(temperature=0.7, top_p=0.9), 12345)]
    monkeypatch.setenv("PARCAE_COMPILE_EXIT", "segments")  # the exit-rule lane compacts its rows between checks
    scheduler = Scheduler(model, max_rows=2, prefill_chunk=3, compile=True)
    events = [[] for _ in jobs]
    for i, job in enumerate(jobs):
        scheduler.submit(job, lambda ev, i=i: events[i].append(ev))
    with caplog.at_level(logging.INFO, logger="parcae.compile"):
        for _ in range(300):
            if all(ev and ev[-1].finish for ev in events):
                break
            scheduler.step()
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("compiled the decode step")]
    assert len(compiled) >= 2  # the lanes decoded through their graphs (fixed depth, warm start)
    for job, ev in zip(jobs, events):
        sampling = Sampling(job.sampling.temperature, job.sampling.top_k, job.sampling.top_p, seed=job.seed)
        out = Engine.from_options(model, job.depth).generate([job.prompt], job.max_new_tokens, sampling)[0]
        assert [e.token for e in ev] == out.tokens and [e.depth for e in ev] == out.depths


def test_perplexity_compile_needs_an_exit_rule(tmp_path):
    from parcae.errors import UsageError
    from parcae.eval.perplexity import perplexity

    with pytest.raises(UsageError, match="--compile applies to perplexity --exit"):
        perplexity(ckpt_path=str(tmp_path / "none.ckpt"), text=tmp_path / "none.txt", compile=True)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_speculation_and_scoring_compiled_equal_eager(model, compile_cache, traced, temperature):
    """Self-speculation's draft steps (another depth) go through their own graph, its verification chunk eagerly on
    the static cache; sampled tokens (each row's generator) and teacher-forced scores equal the eager engine's."""
    from parcae.inference import Sampling

    sampling = Sampling(temperature=temperature, seed=3)
    eager, compiled = Engine(model, loops=3, speculate="1:2"), Engine(model, loops=3, speculate="1:2", compile=True)
    a, b = eager.generate(PROMPTS, NEW, sampling), compiled.generate(PROMPTS, NEW, sampling)
    assert [r.tokens for r in b] == [r.tokens for r in a]
    nll_e, depth_e = Engine(model, loops=3).score(PROMPTS)
    nll_c, depth_c = Engine(model, loops=3, compile=True).score(PROMPTS)
    assert depth_c == depth_e
    assert max(abs(x - y) for r, s in zip(nll_e, nll_c) for x, y in zip(r, s)) <= TOL
