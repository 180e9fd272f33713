"""A word-level tokenizer and a fixed bigram language model whose predictions can be worked out by hand."""

from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, models, pre_tokenizers

WORDS = ["<|bos|>", "<|eos|>", "<|pad|>", "pet", "cat", "dog", "fish", "bird", "cow", "the", "sat", "ran", "down",
         "answer"]
IX = {w: i for i, w in enumerate(WORDS)}
# p(next | previous) before normalisation; every other entry is 1e-3
BIGRAMS = {"pet": {"cat": .4, "dog": .3, "fish": .1, "bird": .1, "cow": .05}, "cow": {"cat": .9},
           "cat": {"sat": .7, "ran": .1}, "dog": {"sat": .2, "ran": .6}, "answer": {"sat": .8, "ran": .1},
           "sat": {"down": .8}}


def word_tokenizer():
    tok = Tokenizer(models.WordLevel(dict(IX), unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


class Bigram(torch.nn.Module):
    """Logits = log of the table row of the previous token; records (shape, loops) of every call."""

    def __init__(self):
        super().__init__()
        probs = torch.full((len(WORDS), len(WORDS)), 1e-3)
        for prev, nxt in BIGRAMS.items():
            for word, p in nxt.items():
                probs[IX[prev], IX[word]] = p
        self.register_buffer("table", probs.log())
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives callers a device
        self.config = SimpleNamespace(looped=True, vocab_size=len(WORDS), block_size=512, mean_recurrence=4)
        self.calls = []

    def forward(self, ids, loops=None, state_seed=None):
        self.calls.append((tuple(ids.shape), loops))
        return SimpleNamespace(logits=self.table[ids])

    def logprob(self, prev: str, nxt: str) -> float:
        """log p(next | previous) after normalising the row, computed directly from the table."""
        row = self.table[IX[prev]].exp()
        return float((row[IX[nxt]] / row.sum()).log())
