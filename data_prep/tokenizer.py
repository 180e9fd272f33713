"""Train a byte-level BPE tokenizer as in the paper (App. R; nanochat's recipe).

Byte-level BPE, GPT-4-style split pattern with numbers in groups of at most two digits (\\p{N}{1,2}),
byte fallback, no normalisation, special tokens <|bos|>, <|eos|>, <|pad|> at ids 0-2. The paper trains
vocabulary 32,768 on 2B characters of FineWeb-Edu with documents capped at 10,000 characters:

    python -m data_prep.tokenizer --input data/raw/fineweb-edu/ --text_field text \\
        --vocab_size 32768 --max_chars 2000000000 --max_doc_chars 10000 --output data/tokenizers/fineweb-32k.json
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator, Literal, Optional

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from parcae.data.tokenizer import SPECIAL_TOKENS

from .sources import SourceError, expand_sources, iter_documents

# GPT-4's (cl100k) split pattern with \p{N}{1,3} narrowed to \p{N}{1,2} (paper App. R, as nanochat).
SPLIT_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*"
                 r"|\s*[\r\n]|\s+(?!\S)|\s+")


def new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None, fuse_unk=False))
    tok.normalizer = None
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = None
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, show_progress: bool = True) -> Tokenizer:
    """Train on an iterator of document texts; specials get ids 0, 1, 2."""
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + specials), got {vocab_size}")
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=0, show_progress=show_progress,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=list(SPECIAL_TOKENS))
    tok.train_from_iterator(texts, trainer)
    return tok


def capped_texts(documents: Iterable, max_chars: Optional[int], max_doc_chars: Optional[int]) -> Iterator[str]:
    """Document texts, each cut to ``max_doc_chars``, stopping once ``max_chars`` characters were yielded."""
    total = 0
    for doc in documents:
        text = doc.text if max_doc_chars is None else doc.text[:max_doc_chars]
        if max_chars is not None and total + len(text) > max_chars:
            text = text[: max_chars - total]
        if text:
            yield text
        total += len(text)
        if max_chars is not None and total >= max_chars:
            return


def tokenizer_command(*, input: list[str], output: str, vocab_size: int = 32768, text_field: str = "text",
                      max_chars: Optional[int] = None, max_doc_chars: Optional[int] = None, exclude_ids: str = "",
                      id_field: Optional[str] = None, decode_errors: Literal["error", "replace"] = "error") -> Path:
    """Train a byte-level BPE tokenizer (paper App. R) (`parcae prepare tokenizer`, `python -m data_prep.tokenizer`).

    Args:
        input: text files/folders, .jsonl[.gz|.xz], .parquet.
        output: where to write tokenizer.json.
        vocab_size: vocabulary size, special tokens included.
        text_field: JSONL field / Parquet column holding the text.
        max_chars: stop after this many characters (paper: 2e9).
        max_doc_chars: cap each document (paper: 10,000).
        exclude_ids: comma-separated document ids to leave out (held-out works).
        id_field: JSONL field / Parquet column with document ids.
        decode_errors: undecodable UTF-8: stop (error) or replace.
    """
    from parcae.errors import UsageError

    try:
        files = expand_sources(input)
        exclude = {x for x in exclude_ids.split(",") if x}
        docs = (d for f in files for d in iter_documents(f, text_field, id_field, decode_errors) if d.id not in exclude)
        tok = train_tokenizer(capped_texts(docs, max_chars, max_doc_chars), vocab_size)
    except (SourceError, ValueError) as err:
        raise UsageError(str(err)) from None
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out))
    print(f"wrote {out} (vocabulary {tok.get_vocab_size()})")
    return out


def main(argv: Optional[list[str]] = None) -> None:
    from parcae.command_line import run_main

    run_main("prepare tokenizer", tokenizer_command, argv)


if __name__ == "__main__":
    main()
