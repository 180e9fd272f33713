"""The lm-evaluation-harness adapter at a fixed loop count: a local task through simple_evaluate, rolling
log-likelihood and loglikelihood checked against the hand-computable bigram model (toy_models.py); generate_until
(which decodes with the engine) against a greedy loop over a tiny real model's full forwards."""

import math
from types import SimpleNamespace

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager

from parcae.eval.lm_eval_adapter import ParcaeEvalLM
from conftest import perturb_weights, write_choice_task
from toy_models import Bigram, word_tokenizer

ITEMS = [("cat", ["cat", "dog", "fish", "bird"], 0), ("cat", ["cat", "dog", "fish", "bird"], 1),
         ("dog", ["dog", "fish", "bird", "cow"], 0), ("cat", ["fish", "bird", "cat", "cow"], 2),
         ("cow cat", ["cow cat", "dog", "fish", "bird"], 0)]


def test_local_multiple_choice_task_through_simple_evaluate(tmp_path):
    write_choice_task(tmp_path, "toy_pets", [("pet", c, g) for _, c, g in ITEMS])
    model = Bigram()
    lm = ParcaeEvalLM(model=model, tokenizer_obj=word_tokenizer(), loops=6, batch_size=4)
    results = lm_eval.simple_evaluate(model=lm, tasks=["toy_pets"], task_manager=TaskManager(include_path=str(tmp_path)))
    # "cat" (p .4) wins among single words; "cow cat" sums ln .05 + ln .9 < ln .3, so "dog" beats it: items 0, 2, 3
    assert results["results"]["toy_pets"]["acc,none"] == pytest.approx(3 / 5)
    assert model.calls and all(loops == 6 for _, loops in model.calls)


def test_rolling_loglikelihood_sums_every_token_once():
    model = Bigram()
    lm = ParcaeEvalLM(model=model, tokenizer_obj=word_tokenizer(), loops=3, max_length=3)  # several windows
    text = "pet cat sat down the dog ran"
    words = text.split()
    expected = model.logprob("<|bos|>", words[0]) + sum(model.logprob(a, b) for a, b in zip(words, words[1:]))
    (got,) = lm.loglikelihood_rolling([SimpleNamespace(args=(text,))])
    assert got == pytest.approx(expected, abs=1e-4)
    assert all(loops == 3 for _, loops in model.calls)


def test_loglikelihood():
    model = Bigram()
    lm = ParcaeEvalLM(model=model, tokenizer_obj=word_tokenizer(), loops=2)
    (lp, greedy), (lp2, greedy2) = lm.loglikelihood([SimpleNamespace(args=("the cat", " sat down")),
                                                    SimpleNamespace(args=("the cat", " ran"))])
    assert lp == pytest.approx(model.logprob("cat", "sat") + model.logprob("sat", "down"), abs=1e-5) and greedy
    assert lp2 == pytest.approx(model.logprob("cat", "ran"), abs=1e-5) and not greedy2
    assert all(loops == 2 for _, loops in model.calls)


def test_generate_until_is_greedy_decoding_of_the_real_vocabulary(tiny_config):
    """generate_until decodes with the engine: the tokens a plain greedy loop over full forwards picks at the same
    loops and initial state, never a padding row (made the largest logits here), cut at the stop string."""
    from parcae.model import LoopedLM
    from toy_models import WORDS

    torch.manual_seed(7)  # a model whose greedy continuation of "the cat" varies: answer fish bird ran ...
    model = perturb_weights(LoopedLM(tiny_config(vocab_size=len(WORDS), padding_multiple=64)), 1.0).eval()
    tok = word_tokenizer()
    lm = ParcaeEvalLM(model=model, tokenizer_obj=tok, loops=2)
    context = "the cat"
    ids = [0, *tok.encode(context, add_special_tokens=False).ids]

    def logits(tokens):
        with torch.no_grad():
            return model(torch.tensor([tokens]), loops=2).logits[0, -1]  # h₀ of (seed 0, position)

    with torch.no_grad():  # padding rows (never tokens) that would win an unmasked argmax
        model.wte.weight[len(WORDS):] = 3 * model.wte.weight[int(logits(ids).argmax())]
    assert int(logits(ids).argmax()) >= len(WORDS)
    expected = []
    for _ in range(6):
        expected.append(int(logits(ids + expected)[: len(WORDS)].argmax()))
        if expected[-1] == 1:  # <|eos|>
            break
    words = tok.decode(expected, skip_special_tokens=True)
    assert len(set(words.split())) >= 3
    (text,) = lm.generate_until([SimpleNamespace(args=(context, {"until": [], "max_gen_toks": 6}))])
    assert text == words
    stop = words.split()[2]
    (cut,) = lm.generate_until([SimpleNamespace(args=(context, {"until": [stop], "max_gen_toks": 6}))])
    assert cut == words[: words.find(stop)] and 0 < len(cut) < len(words)
