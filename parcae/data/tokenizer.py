"""Tokenizer helpers shared by data preparation, training (bits per byte) and evaluation.

A parcae tokenizer is a HuggingFace ``tokenizers`` ``tokenizer.json`` (byte-level BPE, paper App. R) with the
special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` at ids 0, 1, 2. Documents are framed as ``<|bos|> ... <|eos|>``,
so those two are required; ``<|pad|>`` is never read (nothing is padded) and may be missing, as in tokenizers
that come with imported models.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, pre_tokenizers

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = (BOS, EOS, PAD)
REQUIRED_SPECIAL_TOKENS = (BOS, EOS)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=8)
def load_tokenizer(path: str) -> Tokenizer:
    if not Path(path).is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    tok = Tokenizer.from_file(str(path))
    missing = [t for t in REQUIRED_SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"{path}: tokenizer lacks special token(s) {', '.join(missing)}")
    return tok


def check_tokenizer_fits(tok: Tokenizer, path: str | Path, model_vocab_size: int, model_name: str = "the model") \
        -> None:
    """Refuse a tokenizer whose vocabulary is not the model's: ids past the model's rows would crash, and a
    smaller vocabulary gives numbers (perplexity, generations) that mean nothing."""
    from .shards import DataError

    size = tok.get_vocab_size(with_added_tokens=True)
    if size != model_vocab_size:
        raise DataError(f"tokenizer {path} has a {size:,}-token vocabulary but {model_name} has vocab_size "
                        f"{model_vocab_size:,}; use the tokenizer the model was trained with")


def encode_prompt(tok: Tokenizer, text: str) -> list[int]:
    """A text as the model sees the start of a document: ``<|bos|>`` then its tokens (no end of text)."""
    return [tok.token_to_id(BOS), *tok.encode(text, add_special_tokens=False).ids]


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {name: tok.token_to_id(name) for name in SPECIAL_TOKENS}


def token_byte_lengths(tok: Tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens): the denominator of bits per byte.

    Byte-level BPE spells every byte as one printable character; mapping those back gives exact byte
    counts, also for tokens that are only part of a multi-byte character.
    """
    byte_of_char = {ch: i for i, ch in enumerate(_byte_level_alphabet())}
    lengths = torch.zeros(tok.get_vocab_size(with_added_tokens=True), dtype=torch.long)
    specials = set(SPECIAL_TOKENS)
    for token, idx in tok.get_vocab(with_added_tokens=True).items():
        if token in specials:
            continue
        if all(ch in byte_of_char for ch in token):
            lengths[idx] = len(token)
        else:  # not a byte-level token (e.g. a foreign added token): count its UTF-8 bytes
            lengths[idx] = len(token.encode("utf-8"))
    return lengths


@lru_cache(maxsize=1)
def _byte_level_alphabet() -> list[str]:
    """The 256 characters ByteLevel uses for bytes 0..255, in byte order (GPT-2's bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    alphabet = [chars[b] for b in range(256)]
    assert set(alphabet) == set(pre_tokenizers.ByteLevel.alphabet())
    return alphabet
