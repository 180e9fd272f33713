"""Tokenizer helpers shared by data preparation, training (bits per byte) and evaluation.

A parcae tokenizer is a HuggingFace ``tokenizers`` ``tokenizer.json`` (byte-level BPE, paper App. R) with the
special tokens ``<|bos|>``, ``<|eos|>``, ``<|pad|>`` at ids 0, 1, 2. Documents are framed as ``<|bos|> ... <|eos|>``,
so those two are required; ``<|pad|>`` is never read (nothing is padded) and may be missing, as in tokenizers
that come with imported models.

This module is the one owner of that framing for every verb: :func:`bos_id` / :func:`eos_id` (never the literal
strings elsewhere), :func:`encode_prompt` (a text as the start of a document: what generation continues and
what every scorer — perplexity, CORE, lm-eval contexts — conditions on), :func:`encode_text` (a text inside a
document: a continuation; both keep a special token's spelling in the text as text unless told otherwise),
:func:`max_token_chars` (a prompt's least token count from its length), :func:`stop_ids` (where generation ends)
and :class:`TextStream` (generated ids to text as it becomes final, for streaming).

    tok = load_tokenizer("data/shakespeare/tokenizer.json")
    ids = encode_prompt(tok, "ROMEO:")            # [bos, ...]
    stream = TextStream(tok)
    for token in generated: print(stream.push(token), end="")
"""

from __future__ import annotations

import hashlib
import threading
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer, pre_tokenizers
from tokenizers.decoders import DecodeStream

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


def check_vocabulary_fits(size: int, what: str, model_vocab_size: int, model_name: str = "the model",
                          fix: str = "use the tokenizer the model was trained with") -> None:
    """The one vocabulary-fit rule: a tokenizer (or shards made with one) fits a model when its vocabulary has
    exactly the model's ``vocab_size`` tokens. Ids past the model's rows would crash; a smaller vocabulary is
    another tokenizer, and its perplexities and generations mean nothing. ``what`` names the tokenizer or folder."""
    from .shards import DataError

    if size != model_vocab_size:
        raise DataError(f"{what} has a {size:,}-token vocabulary but {model_name} has vocab_size "
                        f"{model_vocab_size:,}; {fix}")


def check_tokenizer_fits(tok: Tokenizer, path: str | Path, model_vocab_size: int, model_name: str = "the model") \
        -> None:
    """Refuse a tokenizer whose vocabulary is not the model's (:func:`check_vocabulary_fits`)."""
    check_vocabulary_fits(tok.get_vocab_size(with_added_tokens=True), f"tokenizer {path}", model_vocab_size,
                          model_name)


def bos_id(tok: Tokenizer) -> int:
    """The id that starts every document (and every prompt)."""
    return tok.token_to_id(BOS)


def eos_id(tok: Tokenizer) -> int:
    """The id that ends every document."""
    return tok.token_to_id(EOS)


def stop_ids(tok: Tokenizer) -> list[int]:
    """Where generation stops: the end of the document."""
    return [eos_id(tok)]


def encode_text(tok: Tokenizer, text: str, *, special_tokens: bool = False) -> list[int]:
    """A text's tokens as they appear inside a document (no special tokens added).

    Text is text: the spelling of a special token in it (``"<|eos|>"``) is encoded as the characters it is made
    of, never as the control token, so a user cannot end a document or start another by typing one. A ``tokenizers``
    Tokenizer matches added special tokens in any text it encodes; a copy of it with ``encode_special_tokens``
    set splits them like ordinary text instead. ``special_tokens=True`` (``--special_tokens``: the caller trusts
    the text) lets their spellings through as the control tokens."""
    return (tok if special_tokens else _text_only(tok)).encode(text, add_special_tokens=False).ids


def encode_prompt(tok: Tokenizer, text: str, *, special_tokens: bool = False) -> list[int]:
    """A text as the model sees the start of a document: ``<|bos|>`` then its tokens (no end of text); the text's
    own special-token spellings stay text unless ``special_tokens`` (:func:`encode_text`)."""
    return [bos_id(tok), *encode_text(tok, text, special_tokens=special_tokens)]


_TEXT_ONLY: "weakref.WeakKeyDictionary[Tokenizer, Tokenizer]" = weakref.WeakKeyDictionary()
_TEXT_ONLY_LOCK = threading.Lock()


def _text_only(tok: Tokenizer) -> Tokenizer:
    """``tok``'s copy that encodes special-token spellings as ordinary text (made once per tokenizer; ``tok``
    itself is shared, e.g. by :func:`load_tokenizer`'s cache, so it is never changed)."""
    with _TEXT_ONLY_LOCK:
        copy = _TEXT_ONLY.get(tok)
        if copy is None:
            copy = _TEXT_ONLY[tok] = Tokenizer.from_str(tok.to_str())
            copy.encode_special_tokens = True
        return copy


def max_token_chars(tok: Tokenizer) -> Optional[int]:
    """The most characters one token can stand for, so a text of ``n`` characters has at least ``n /
    max_token_chars`` tokens: a size check that needs no tokenizing. A token's text has at most as many
    characters as UTF-8 bytes (:func:`token_byte_lengths`); an added token (``<|bos|>``) is matched as its spelling.
    None where the tokenizer has a normalizer (one may shorten a text before it is split, e.g. NFKC composing two
    characters into one)."""
    if tok.normalizer is not None:
        return None
    added = [len(t.content) for t in tok.get_added_tokens_decoder().values()]
    return max(int(token_byte_lengths(tok).max()), *added, 1)


class TextStream:
    """Generated token ids in, text out as soon as it is final: a character whose UTF-8 bytes span several
    byte-level tokens is held back until its last byte arrives (tokenizers' ``DecodeStream``); special tokens
    are dropped. ``text`` is everything emitted so far."""

    def __init__(self, tok: Tokenizer) -> None:
        self._tok, self._stream, self.text = tok, DecodeStream(skip_special_tokens=True), ""

    def push(self, token_id: int) -> str:
        """The new final text after ``token_id`` ("" while a character is incomplete)."""
        piece = self._stream.step(self._tok, int(token_id)) or ""
        self.text += piece
        return piece


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
