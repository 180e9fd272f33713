"""Teacher-forced scoring through the engine (parcae perplexity --exit) against the model's full forward."""

import pytest
import torch

from parcae.eval.perplexity import text_nll
from parcae.inference import Engine
from parcae.inference.elastic import elastic_nll
from test_engine import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [0] + [int(t) for t in torch.randint(3, 96, (40,), generator=torch.Generator().manual_seed(0))]


@pytest.mark.parametrize("family", ["parcae", "rdm"])
def test_fixed_depth_scoring_equals_the_full_forward_perplexity(family):
    model = tiny_model(family, seed=11)
    nll, count = text_nll(model, IDS, loops=3, window=16, context=1, batch_size=2)
    row = elastic_nll(Engine(model, loops=3), IDS, window=16, batch_size=2)
    assert row["tokens"] == count == len(IDS) - 1 and row["mean_loops"] == 3
    assert row["loss"] == pytest.approx(nll / count, abs=1e-5)


def test_adaptive_scoring_reports_mean_loops_and_meets_fixed_depth_at_the_bounds():
    model = tiny_model("parcae", seed=12)
    fixed = elastic_nll(Engine(model, loops=5), IDS, window=16, batch_size=2)
    never = elastic_nll(Engine(model, exit="kl:1e-30", max_loops=5, kv_policy="latest"), IDS, window=16, batch_size=2)
    assert never["mean_loops"] == 5 and never["loss"] == pytest.approx(fixed["loss"], abs=1e-5)
    early = elastic_nll(Engine(model, exit="latent-diff:0.3", max_loops=5, kv_policy="latest"), IDS, window=16,
                        batch_size=2)
    assert 1 <= early["mean_loops"] < 5
    assert early["mean_iterations_computed"] == pytest.approx(early["mean_loops"])  # latest computes only what it uses
