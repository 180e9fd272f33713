"""One scoring rule for every verb: on the same tokens, with a vocabulary that is not a multiple of the padding,
`parcae test` (the Lightning module's test loop), `parcae perplexity` (text_nll), CORE, lm-eval and the engine's
teacher-forced score give the same loss — the softmax over the real vocabulary — and it is not the loss over the
padded logits."""

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer

from conftest import perturb_weights
from parcae.eval.core import CoreScorer
from parcae.eval.perplexity import text_nll
from parcae.inference import Engine
from parcae.training.module import LoopedLMModule, loop_rows
from toy_models import word_tokenizer


def test_test_perplexity_core_lm_eval_and_engine_agree_on_the_loss(tiny_config):
    torch.manual_seed(0)
    arch = tiny_config(vocab_size=100, padding_multiple=64)   # 100 real rows, 128 logits
    assert arch.padded_vocab_size == 128
    module = LoopedLMModule(arch=arch, test_loops=[2])
    perturb_weights(module.net, 0.2)
    net = module.net.eval()
    ids = torch.randint(0, 100, (17,)).tolist()
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (row,) = loop_rows(trainer.test(module, dataloaders=torch.utils.data.DataLoader([(x, y)], batch_size=None),
                                    verbose=False)[0])
    assert row["loops"] == 2
    test_loss = row["loss"]

    nll, count = text_nll(net, ids, loops=2, window=len(ids))
    assert count == 16
    with torch.no_grad():
        logits = net(x, loops=2).logits
    padded_loss = F.cross_entropy(logits[0], y[0]).item()      # a softmax over all 128 rows
    real_loss = F.cross_entropy(logits[0, :, :100], y[0]).item()
    assert abs(padded_loss - real_loss) > 1e-3                  # the padding matters for this model

    (engine_nll,), _ = Engine(net, loops=2).score([ids])
    (core_loss,), _ = CoreScorer(net, word_tokenizer(), loops=2)._run([ids])
    losses = {"test": test_loss, "perplexity": nll / count, "engine": sum(engine_nll) / 16,
              "core": core_loss.mean().item()}
    lm_eval = pytest.importorskip("parcae.eval.lm_eval_adapter")
    lm = lm_eval.ParcaeEvalLM(model=net, tokenizer_obj=word_tokenizer(), loops=2)
    ((logprob, _),) = lm._score([(ids[:1], ids[1:])])
    losses["lm-eval"] = -logprob / 16
    for name, loss in losses.items():
        assert loss == pytest.approx(real_loss, abs=2e-5), name
