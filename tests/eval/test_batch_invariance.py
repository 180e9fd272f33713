"""One rule for the evaluation h₀ (docs/design.md §1.4): a row's initial state depends on (seed, position) only —
every row is sequence 0 — so a row's logits and scores are the numbers it gets alone, at batch size 1 or 8 and in
any position of the batch, in every evaluation path: the model's eval forward, `parcae test` (the Lightning test
loop), perplexity (text_nll), CORE and the lm-eval adapter. The reference each test compares with is the plain
eval forward of one row alone (independent of the batching code under test)."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from conftest import perturb_weights
from parcae.eval.core import CoreScorer
from parcae.eval.perplexity import text_nll
from parcae.training.module import LoopedLMModule, loop_rows
from toy_models import word_tokenizer

LOOPS = 2


@pytest.fixture(scope="module")
def net():
    from parcae.model import LoopedLM, ModelConfig

    torch.manual_seed(0)
    config = ModelConfig(name="tiny", vocab_size=100, block_size=32, d_model=64, n_heads=4, d_ff=128, n_prelude=1,
                         n_recurrent=1, n_coda=1, mean_recurrence=4, backprop_depth=2)
    return perturb_weights(LoopedLM(config), 0.2).eval()


def _alone(net, ids) -> torch.Tensor:
    with torch.no_grad():
        return net(torch.tensor([ids]), loops=LOOPS).logits[0]


def _rows(n=8, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 100, (n, length), generator=g)


def test_eval_forward_gives_each_row_its_alone_logits_in_any_position(net):
    rows = _rows()
    with torch.no_grad():
        batch = net(rows, loops=LOOPS).logits
        flipped = net(rows.flip(0), loops=LOOPS).logits.flip(0)
    for i in range(len(rows)):
        alone = _alone(net, rows[i].tolist())
        torch.testing.assert_close(batch[i], alone, atol=1e-5, rtol=0)
        torch.testing.assert_close(flipped[i], alone, atol=1e-5, rtol=0)
    # the rule is about the noise, not a model that ignores it: named sequences still change a row
    with torch.no_grad():
        named = net(rows[:2], loops=LOOPS, state_seed=[0, 1]).logits
    assert (named[1] - batch[1]).abs().max() > 1e-4


def test_parcae_test_loss_is_the_same_at_batch_size_1_and_8(net):
    module = LoopedLMModule(arch=net.config, test_loops=[LOOPS])
    module.net.load_state_dict(net.state_dict())
    data = _rows(8, 13, seed=2)
    x, y = data[:, :-1], data[:, 1:]

    def test_loss(batch_size):
        batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
        trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
        loader = torch.utils.data.DataLoader(batches, batch_size=None)
        (row,) = loop_rows(trainer.test(module, dataloaders=loader, verbose=False)[0])
        return row["loss"]

    expected = sum(F.cross_entropy(_alone(net, x[i].tolist())[:, :100], y[i], reduction="sum").item()
                   for i in range(len(x))) / y.numel()
    assert test_loss(1) == pytest.approx(expected, abs=1e-5)
    assert test_loss(8) == pytest.approx(expected, abs=1e-5)


def test_perplexity_windows_score_as_each_window_alone(net):
    ids = _rows(1, 40, seed=3)[0].tolist()
    window = 9  # context 1: windows [0, 9), [8, 17), ... each scored from its own tokens only
    expected, count = 0.0, 0
    start = 0
    while start < len(ids) - 1:
        piece = ids[start:start + window]
        logits = _alone(net, piece[:-1])
        expected += F.cross_entropy(logits[:, :100], torch.tensor(piece[1:]), reduction="sum").item()
        count += len(piece) - 1
        start += window - 1
    for batch_size in (1, 8):
        nll, n = text_nll(net, ids, loops=LOOPS, window=window, batch_size=batch_size)
        assert n == count and nll == pytest.approx(expected, abs=1e-4), batch_size


def test_core_rows_score_as_alone_at_batch_size_1_and_8(net):
    sequences = [r[: 6 + i].tolist() for i, r in enumerate(_rows(8, 14, seed=4))]  # ragged: right padding too
    for batch_size in (1, 8):
        losses, _ = CoreScorer(net, word_tokenizer(), loops=LOOPS, batch_size=batch_size)._run(sequences)
        for seq, loss in zip(sequences, losses):
            alone = F.cross_entropy(_alone(net, seq)[:-1, :100], torch.tensor(seq[1:]), reduction="none")
            torch.testing.assert_close(loss, alone, atol=1e-5, rtol=0)


def test_lm_eval_loglikelihoods_are_the_alone_numbers_at_batch_size_1_and_8(net):
    lm_eval = pytest.importorskip("parcae.eval.lm_eval_adapter")
    pairs = [(r[:3].tolist(), r[3: 5 + i].tolist()) for i, r in enumerate(_rows(8, 12, seed=5))]
    for batch_size in (1, 8):
        lm = lm_eval.ParcaeEvalLM(model=net, tokenizer_obj=word_tokenizer(), loops=LOOPS, batch_size=batch_size)
        for (context, continuation), (logprob, _) in zip(pairs, lm._score(pairs)):
            full = context + continuation
            logits = _alone(net, full[:-1])[len(context) - 1:, :100]
            expected = -F.cross_entropy(logits, torch.tensor(continuation), reduction="sum").item()
            assert logprob == pytest.approx(expected, abs=1e-4), batch_size
