"""Text perplexity: every token scored once whatever the window, word perplexity and bits per byte by hand."""

import math

import pytest

from parcae.eval.perplexity import text_nll, text_perplexity
from toy_models import IX, Bigram, word_tokenizer

TEXT = "pet cat sat down the dog ran"


def _hand_nll(model):
    words = TEXT.split()
    return -(model.logprob("<|bos|>", words[0]) + sum(model.logprob(a, b) for a, b in zip(words, words[1:])))


@pytest.mark.parametrize("window", [2, 3, 5, 64])
def test_windows_score_every_token_once(window):
    model = Bigram()
    ids = [IX["<|bos|>"]] + [IX[w] for w in TEXT.split()]
    nll, count = text_nll(model, ids, loops=3, window=window, context=1)
    assert count == 7 and nll == pytest.approx(_hand_nll(model), abs=1e-4)
    assert all(loops == 3 for _, loops in model.calls)


def test_token_word_and_byte_metrics():
    model = Bigram()
    (row,) = text_perplexity(model, word_tokenizer(), TEXT, [5], window=4)
    nll = _hand_nll(model)
    assert row["word_perplexity"] == pytest.approx(math.exp(nll / 7), rel=1e-5)
    assert row["token_perplexity"] == pytest.approx(math.exp(nll / 7), rel=1e-5)  # one token per word here
    assert row["bits_per_byte"] == pytest.approx(nll / (math.log(2) * len(TEXT)), rel=1e-5)


def test_bad_windows_and_short_text():
    with pytest.raises(ValueError, match="context"):
        text_nll(Bigram(), [0, 3, 4], loops=1, window=2, context=2)
    with pytest.raises(ValueError, match="too short"):
        text_nll(Bigram(), [0], loops=1, window=4)
