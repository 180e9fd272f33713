"""Read documents from plain text, JSONL and Parquet files (optionally .gz / .xz / .bz2 compressed).

* plain text (any other suffix): the whole file is one document, its id the file name;
* ``.jsonl``: one JSON object per line, text in ``text_field``; id from ``id_field`` or ``<file>:<line>``;
* ``.parquet``: text in column ``text_field`` (FineWeb-Edu and the Huginn dataset ship this way).

Bad input stops with a one-line :class:`SourceError` naming the file (and field): an empty file, a missing
field or column, a line that is not JSON, or undecodable UTF-8 bytes. With ``decode_errors="replace"``
undecodable sequences become U+FFFD and are *counted* (``Document.undecodable``), never silently dropped.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional

COMPRESSED = {".gz": gzip.open, ".xz": lzma.open, ".bz2": bz2.open}
TEXT_SUFFIXES = {".txt", ".md", ".text", ".rst"}


class SourceError(ValueError):
    """A problem with an input file, stated in one line that names the file."""


@dataclass
class Document:
    id: str
    text: str
    undecodable: int = 0  # byte sequences replaced by U+FFFD (only with decode_errors="replace")


def _kind(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    last = suffixes[-1] if suffixes else ""
    if last == ".jsonl" or last == ".json":
        return "jsonl"
    if last == ".parquet":
        return "parquet"
    return "text"


def _open_binary(path: Path) -> IO[bytes]:
    opener = COMPRESSED.get(path.suffix.lower())
    return opener(path, "rb") if opener else open(path, "rb")


def expand_sources(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named directly, and the files inside folders (recursively, sorted); hidden files skipped."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            if not found:
                raise SourceError(f"{path}: folder contains no files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise SourceError(f"{path}: no such file or folder")
    return files


class _ReplacementCounter:
    """A codec error handler that replaces like errors="replace" but counts what it replaced."""

    count = 0

    @classmethod
    def handle(cls, err: UnicodeDecodeError):
        cls.count += 1
        return "\ufffd", err.end


codecs.register_error("parcae_count_replace", _ReplacementCounter.handle)


def decode(data: bytes, where: str, decode_errors: str) -> tuple[str, int]:
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError as err:
        _ReplacementCounter.count = 0
        text = data.decode("utf-8", errors="parcae_count_replace")
        bad = _ReplacementCounter.count
        if decode_errors == "error":
            raise SourceError(f"{where}: {bad} undecodable UTF-8 byte sequence(s), the first at byte {err.start}; "
                              "fix the file or pass --decode_errors replace to count and replace them") from None
        return text, bad


def check_source(path: Path, text_field: str) -> None:
    """Cheap up-front check (before any worker starts): exists, not empty, field present in the first record."""
    if not path.is_file():
        raise SourceError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise SourceError(f"{path}: empty file")
    kind = _kind(path)
    if kind == "parquet":
        import pyarrow.parquet as pq

        schema = pq.read_schema(path)
        if text_field not in schema.names:
            raise SourceError(f"{path}: no column {text_field!r} (columns: {', '.join(schema.names)})")
    elif kind == "jsonl":
        with _open_binary(path) as f:
            for number, line in enumerate(f, 1):
                if line.strip():  # structure only: undecodable bytes are handled (per policy) when reading
                    _json_text(line.decode("utf-8", errors="replace"), path, number, text_field)
                    return
        raise SourceError(f"{path}: empty file (no JSON lines)")


def _json_text(line: bytes | str, path: Path, number: int, text_field: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise SourceError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict) or text_field not in record:
        fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise SourceError(f"{path}:{number}: no field {text_field!r} (fields: {fields})")
    if not isinstance(record[text_field], str):
        raise SourceError(f"{path}:{number}: field {text_field!r} is {type(record[text_field]).__name__}, not text")
    return record


def iter_documents(path: Path, text_field: str = "text", id_field: Optional[str] = None,
                   decode_errors: str = "error") -> Iterator[Document]:
    """Documents of one file, in file order. Empty documents (no text) are skipped."""
    path = Path(path)
    check_source(path, text_field)
    kind = _kind(path)
    produced = 0
    if kind == "text":
        with _open_binary(path) as f:
            text, bad = decode(f.read(), str(path), decode_errors)
        if text.strip():
            produced += 1
            yield Document(path.name.split(".")[0], text, bad)
    elif kind == "jsonl":
        with _open_binary(path) as f:
            for number, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                line, bad = decode(raw, f"{path}:{number}", decode_errors)
                record = _json_text(line.encode("utf-8") if bad else raw, path, number, text_field)
                text = record[text_field]
                if not text.strip():
                    continue
                doc_id = str(record[id_field]) if id_field and id_field in record else f"{path.name}:{number}"
                produced += 1
                yield Document(doc_id, text, bad)
    else:
        import pyarrow.parquet as pq

        columns = [text_field] + ([id_field] if id_field else [])
        row = 0
        for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=1024):
            texts = batch.column(text_field).to_pylist()
            ids = batch.column(id_field).to_pylist() if id_field else [None] * len(texts)
            for text, doc_id in zip(texts, ids):
                row += 1
                if text and text.strip():
                    produced += 1
                    yield Document(str(doc_id) if doc_id is not None else f"{path.name}:{row}", text)
    if produced == 0:
        raise SourceError(f"{path}: no non-empty documents")
