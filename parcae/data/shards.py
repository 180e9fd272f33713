"""Prepared shard folders: layout, manifest, and the checks training runs before reading them.

    <root>/manifest.json   token/document counts per split, tokenizer vocabulary + sha256, sources, date
    <root>/tokenizer.json  the tokenizer the shards were made with
    <root>/train/, val/    LitData chunks + index.json (int32 tokens, documents as <|bos|> ... <|eos|>)
    <root>/test/           optional held-out test split (``--test_fraction``), evaluated by ``parcae test``
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from parcae.errors import UsageError

MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_FORMAT = "parcae-token-shards/1"
SPLITS = ("train", "val")          # every shard folder has these
OPTIONAL_SPLITS = ("test",)       # written when data preparation is asked for a held-out test split
PREPARE_HINT = "prepare it with `python -m data_prep.shards --input <text files> --tokenizer <tokenizer.json> " \
               "--output {root}` (the embedded corpus: `python -m data_prep.shakespeare`)"


class DataError(UsageError):
    """Unusable training data; the message is one line naming the folder."""


@dataclass(frozen=True)
class ShardFolder:
    root: Path
    manifest: dict

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["tokenizer"]["vocab_size"])

    @property
    def tokenizer_sha256(self) -> str:
        return self.manifest["tokenizer"]["sha256"]

    @property
    def tokenizer_path(self) -> Path:
        return self.root / self.manifest["tokenizer"].get("file", TOKENIZER_FILE)

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def has_split(self, split: str) -> bool:
        return split in self.manifest["splits"] and (self.root / split / "index.json").is_file()

    def tokens(self, split: str) -> int:
        return int(self.manifest["splits"][split]["tokens"])


def open_shards(root: str | Path, prepare_hint: str | None = None) -> ShardFolder:
    """Validate a prepared shard folder; every problem is a one-line DataError naming the folder and the fix."""
    root = Path(root)
    hint = prepare_hint or PREPARE_HINT.format(root=root)
    if not root.exists():
        raise DataError(f"shard folder {root} does not exist; {hint}")
    if not (root / MANIFEST).is_file():
        raise DataError(f"{root} has no {MANIFEST}, so it is not a complete shard folder; {hint}")
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{root / MANIFEST} is not valid JSON ({err.msg}); {hint}") from None
    if manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{root / MANIFEST} has format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
    for split in SPLITS:
        index = root / split / "index.json"
        if not index.is_file():
            raise DataError(f"{root / split} is missing or has no index.json; {hint}")
        if int(manifest["splits"][split]["tokens"]) == 0:
            raise DataError(f"{root / split} holds no tokens; {hint}")
        check_chunks(root / split, hint)
    for split in OPTIONAL_SPLITS:
        if (root / split / "index.json").is_file():
            check_chunks(root / split, hint)
    return ShardFolder(root, manifest)


def check_chunks(split_dir: Path, hint: str = "") -> None:
    """Every chunk named in LitData's ``index.json`` exists with the size the index records, so a truncated or
    missing chunk is named here instead of surfacing later as a loader timeout (a stat per chunk; no reading)."""
    index_path = split_dir / "index.json"
    try:
        index = json.loads(index_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{index_path} is not valid JSON ({getattr(err, 'msg', err)}); {hint}") from None
    chunks = index.get("chunks") if isinstance(index, dict) else None
    if not isinstance(chunks, list) or not chunks:
        raise DataError(f"{index_path} lists no chunks; {hint}")
    compressed = (index.get("config") or {}).get("compression")
    for chunk in chunks:
        path = split_dir / str(chunk.get("filename", ""))
        if not path.is_file():
            raise DataError(f"chunk {path} listed in {index_path} is missing; {hint}")
        expected, actual = chunk.get("chunk_bytes"), path.stat().st_size
        if not compressed and isinstance(expected, int) and actual != expected:
            raise DataError(f"chunk {path} is damaged: {actual:,} bytes where {index_path.name} records "
                            f"{expected:,}; prepare the shards again")


def check_vocabulary(folder: ShardFolder, model_vocab_size: int, model_name: str = "the model") -> None:
    """Refuse shards whose tokenizer vocabulary differs from the model's (the rule: ``check_vocabulary_fits``)."""
    from .tokenizer import check_vocabulary_fits

    check_vocabulary_fits(folder.vocab_size, f"{folder.root} was tokenized with a tokenizer that",
                          model_vocab_size, model_name, "use a matching tokenizer or model")
