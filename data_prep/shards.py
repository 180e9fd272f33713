"""Tokenize corpora into LitData token shards: ``<output>/{train,val}/`` + ``manifest.json`` + ``tokenizer.json``.

Every document becomes ``<|bos|> tokens <|eos|>`` and documents are stored back to back (LitData
``TokensLoader``), so training reads fixed-length blocks in which every position is a real token; nothing
is padded. A block never crosses a chunk boundary, so each chunk loses at most one block's worth of
tokens at its end (``chunk_tokens`` ≫ block size keeps that negligible). Documents go to the validation
split by a seeded hash of their id (``--val_fraction``) or by name (``--val_ids``), so the split does not
depend on the number of worker processes.

Re-running on the same inputs is a no-op; ``--overwrite`` rebuilds. The output appears only when complete:
everything is written into a hidden staging folder that is renamed at the end, and removed on failure.

    # FineWeb-Edu parquet files (paper §4), training the paper's tokenizer first (App. R) — one command:
    python -m data_prep.shards --input data/raw/fineweb-edu/sample/100BT --output data/fineweb-edu \\
        --vocab_size 32768 --max_chars 2000000000 --max_doc_chars 10000 --val_fraction 0.001 --num_workers 16
    # ... or with an existing tokenizer:
    python -m data_prep.shards --input data/raw/fineweb-edu/sample/100BT --tokenizer data/tokenizers/fineweb-32k.json \\
        --output data/fineweb-edu --num_workers 16
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Iterator, Literal, Optional, Sequence

import torch

from parcae.data.shards import MANIFEST, MANIFEST_FORMAT, OPTIONAL_SPLITS, SPLITS, TOKENIZER_FILE
from parcae.data.tokenizer import BOS, EOS, PAD, file_sha256, load_tokenizer
from parcae.errors import UsageError

from .sources import SourceError, check_source, expand_sources, iter_documents

DEFAULT_CHUNK_TOKENS = 1 << 24  # ~16.8M tokens, 64 MB of int32 per chunk


class ShardError(RuntimeError):
    """Shard preparation failed; the message is one line."""


@dataclass(frozen=True)
class ShardOptions:
    tokenizer: str
    text_field: str = "text"
    id_field: Optional[str] = None
    val_fraction: float = 0.01
    val_ids: tuple[str, ...] = field(default_factory=tuple)
    seed: int = 1234
    decode_errors: str = "error"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    test_fraction: float = 0.0


def split_of(doc_id: str, options: ShardOptions) -> str:
    """"val", "test" or "train" for a document: val by name if val_ids are given, else by a seeded hash of its
    id (val below ``val_fraction``, test in the next ``test_fraction``), so adding documents moves none."""
    digest = hashlib.blake2b(f"{options.seed}:{doc_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(digest, "big") / 2**64
    if options.val_ids:
        if doc_id in options.val_ids:
            return "val"
        return "test" if u < options.test_fraction else "train"
    if u < options.val_fraction:
        return "val"
    return "test" if u < options.val_fraction + options.test_fraction else "train"


def _splits(options: ShardOptions) -> tuple[str, ...]:
    return SPLITS + (OPTIONAL_SPLITS if options.test_fraction > 0 else ())


def _tokenize_file(path: str, *, split: str, options: ShardOptions, stats_dir: str) -> Iterator[torch.Tensor]:
    """LitData worker function: yields one int32 tensor per document of ``split`` in ``path``."""
    tok = load_tokenizer(options.tokenizer)
    bos, eos = tok.token_to_id(BOS), tok.token_to_id(EOS)
    stats = {"file": path, "split": split, "documents": 0, "tokens": 0, "undecodable": 0, "ids": []}
    batch: list = []

    def flush():
        for doc, enc in zip(batch, tok.encode_batch([d.text for d in batch], add_special_tokens=False)):
            ids = [bos, *enc.ids, eos]
            stats["documents"] += 1
            stats["tokens"] += len(ids)
            stats["undecodable"] += doc.undecodable
            if options.val_ids:
                stats["ids"].append(doc.id)
            yield torch.tensor(ids, dtype=torch.int32)
        batch.clear()

    name = hashlib.sha1(f"{split}:{path}".encode()).hexdigest()[:16]
    try:
        for doc in iter_documents(Path(path), options.text_field, options.id_field, options.decode_errors):
            if split_of(doc.id, options) == split:
                batch.append(doc)
                if len(batch) == 256:
                    yield from flush()
        yield from flush()
    except SourceError as err:  # hand the one-line message to the main process, which reports it
        Path(stats_dir, f"{name}.error").write_text(str(err))
        raise
    Path(stats_dir, f"{name}.json").write_text(json.dumps(stats))


def _fingerprint(files: Sequence[Path], options: ShardOptions, tokenizer_sha: str) -> str:
    state = {"files": [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
             "tokenizer": tokenizer_sha, "options": {**asdict(options), "tokenizer": None}}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _split_summary(split_dir: Path) -> dict:
    index = json.loads((split_dir / "index.json").read_text())
    chunks = index["chunks"]
    return {"tokens": sum(c["dim"] for c in chunks), "documents": sum(c["chunk_size"] for c in chunks),
            "chunks": len(chunks)}


def prepare_shards(inputs: Sequence[str | Path], output: str | Path, tokenizer: str | Path, *,
                   text_field: str = "text", id_field: Optional[str] = None, val_fraction: float = 0.01,
                   val_ids: Sequence[str] = (), seed: int = 1234, num_workers: int = 1,
                   chunk_tokens: int = DEFAULT_CHUNK_TOKENS, decode_errors: str = "error",
                   overwrite: bool = False, quiet: bool = False, test_fraction: float = 0.0) -> dict:
    """Build the shard folder ``output`` and return its manifest (see module docstring)."""
    say = (lambda *a: None) if quiet else (lambda *a: print("[shards]", *a, flush=True))
    if not 0.0 <= val_fraction < 1.0:
        raise ShardError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not 0.0 <= test_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ShardError(f"test_fraction must be in [0, 1) and leave documents for training "
                         f"(val_fraction {val_fraction} + test_fraction {test_fraction} < 1)")
    if decode_errors not in ("error", "replace"):
        raise ShardError(f"decode_errors must be 'error' or 'replace', got {decode_errors!r}")
    try:
        files = expand_sources(inputs)
        for f in files:
            check_source(f, text_field)
        tok = load_tokenizer(str(Path(tokenizer).resolve()))
    except (SourceError, FileNotFoundError, ValueError) as err:
        raise ShardError(str(err)) from None
    options = ShardOptions(str(Path(tokenizer).resolve()), text_field, id_field, val_fraction, tuple(val_ids), seed,
                           decode_errors, chunk_tokens, test_fraction)
    splits_written = _splits(options)
    tokenizer_sha = file_sha256(tokenizer)
    fingerprint = _fingerprint(files, options, tokenizer_sha)

    out = Path(output)
    if (out / MANIFEST).is_file():
        existing = json.loads((out / MANIFEST).read_text())
        if existing.get("fingerprint") == fingerprint and not overwrite:
            say(f"{out} is up to date ({existing['splits']['train']['tokens']:,} train tokens); nothing to do")
            return existing
        if not overwrite:
            raise ShardError(f"{out} already holds shards prepared from other inputs or options; "
                             "pass --overwrite to rebuild it")
    elif out.exists() and any(out.iterdir()) and not overwrite:
        raise ShardError(f"{out} exists and is not a complete shard folder (no {MANIFEST}); "
                         "pass --overwrite to replace it")

    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.partial-*"):  # left by an interrupted run
        shutil.rmtree(stale, ignore_errors=True)
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    stats_dir = staging / ".stats"
    stats_dir.mkdir(parents=True)
    os.environ["DATA_OPTIMIZER_CACHE_FOLDER"] = str(staging / ".cache" / "chunks")
    os.environ["DATA_OPTIMIZER_DATA_CACHE_FOLDER"] = str(staging / ".cache" / "data")
    started = time.time()
    try:
        from litdata import TokensLoader, optimize

        for split in splits_written:
            say(f"tokenizing the {split} split of {len(files)} file(s) with {num_workers} worker(s)")
            optimize(fn=partial(_tokenize_file, split=split, options=options, stats_dir=str(stats_dir)),
                     inputs=[str(f) for f in files], output_dir=str(staging / split), chunk_size=chunk_tokens,
                     item_loader=TokensLoader(), num_workers=max(1, num_workers), mode="overwrite",
                     reorder_files=False, verbose=not quiet)
        stats = [json.loads(p.read_text()) for p in stats_dir.glob("*.json")]
        if len(stats) != len(splits_written) * len(files):
            raise ShardError(f"a worker failed: statistics for {len(splits_written) * len(files) - len(stats)} "
                             "file/split pair(s) "
                             "are missing (see the worker output above)")
        if val_ids:
            seen = {i for s in stats if s["split"] == "val" for i in s["ids"]}
            if missing := [i for i in val_ids if i not in seen]:
                raise ShardError(f"held-out document id(s) not found in the inputs: {', '.join(missing)}")
        splits = {}
        for split in splits_written:
            summary = _split_summary(staging / split) if (staging / split / "index.json").is_file() else None
            if not summary or summary["documents"] == 0:
                raise ShardError(f"no documents fell into the {split} split; "
                                 "change --val_fraction / --test_fraction or name documents with --val_ids")
            splits[split] = summary
            expected = sum(s["tokens"] for s in stats if s["split"] == split)
            if splits[split]["tokens"] != expected:
                raise ShardError(f"{split}: shards hold {splits[split]['tokens']} tokens, workers wrote {expected}")
        undecodable = sum(s["undecodable"] for s in stats)
        shutil.copyfile(tokenizer, staging / TOKENIZER_FILE)
        manifest = {
            "format": MANIFEST_FORMAT,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "fingerprint": fingerprint,
            "dtype": "int32",
            "tokenizer": {"file": TOKENIZER_FILE, "source": str(tokenizer), "sha256": tokenizer_sha,
                          "vocab_size": tok.get_vocab_size(), "bos_id": tok.token_to_id(BOS),
                          "eos_id": tok.token_to_id(EOS), "pad_id": tok.token_to_id(PAD)},
            "splits": splits,
            "sources": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
            "options": {"text_field": text_field, "id_field": id_field, "val_fraction": val_fraction,
                        "test_fraction": test_fraction,
                        "val_ids": list(val_ids), "seed": seed, "decode_errors": decode_errors,
                        "chunk_tokens": chunk_tokens},
            "undecodable_sequences_replaced": undecodable,
        }
        shutil.rmtree(stats_dir)
        shutil.rmtree(staging / ".cache", ignore_errors=True)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out.exists():
            trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(trash)
            staging.rename(out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException as err:
        worker_errors = sorted(stats_dir.glob("*.error")) if stats_dir.is_dir() else []
        message = worker_errors[0].read_text() if worker_errors else None
        shutil.rmtree(staging, ignore_errors=True)
        if message:
            raise ShardError(message) from None
        if isinstance(err, (ShardError, KeyboardInterrupt)):
            raise
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ShardError(f"shard preparation failed: {first_line}") from err
    if undecodable:
        say(f"warning: {undecodable} undecodable byte sequence(s) were replaced by U+FFFD (counted in the manifest)")
    say(f"wrote {out}: " + ", ".join(f"{s} {v['tokens']:,} tokens / {v['documents']:,} documents / "
                                     f"{v['chunks']} chunks" for s, v in splits.items())
        + f" in {time.time() - started:.1f}s")
    return manifest


def train_split_tokenizer(inputs: Sequence[str | Path], output: Path, vocab_size: int, *, text_field: str = "text",
                          id_field: Optional[str] = None, val_fraction: float = 0.01, val_ids: Sequence[str] = (),
                          seed: int = 1234, decode_errors: str = "error", max_chars: Optional[int] = None,
                          max_doc_chars: Optional[int] = None, test_fraction: float = 0.0) -> Path:
    """Train the paper's tokenizer on the documents that will form the training split (never on validation)."""
    from .tokenizer import capped_texts, train_tokenizer

    if output.is_file():
        print(f"[shards] using the existing tokenizer {output} (delete it to retrain)", flush=True)
        return output
    options = ShardOptions("", text_field, id_field, val_fraction, tuple(val_ids), seed, decode_errors,
                           test_fraction=test_fraction)
    try:
        files = expand_sources(inputs)
        docs = (d for f in files for d in iter_documents(f, text_field, id_field, decode_errors)
                if split_of(d.id, options) == "train")
        tok = train_tokenizer(capped_texts(docs, max_chars, max_doc_chars), vocab_size)
    except (SourceError, ValueError) as err:
        raise ShardError(str(err)) from None
    output.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(output))
    print(f"[shards] trained a {tok.get_vocab_size():,}-token tokenizer on the training split: {output}", flush=True)
    return output


def shards_command(*, input: list[str], output: str, tokenizer: Optional[str] = None,
                   vocab_size: Optional[int] = None, max_chars: Optional[int] = None,
                   max_doc_chars: Optional[int] = None, text_field: str = "text", id_field: Optional[str] = None,
                   val_fraction: float = 0.01, val_ids: str = "", test_fraction: float = 0.0, seed: int = 1234,
                   num_workers: int = max(1, (os.cpu_count() or 2) - 1), chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
                   decode_errors: Literal["error", "replace"] = "error", overwrite: bool = False) -> dict:
    """Tokenize text/JSONL/Parquet into LitData token shards (`parcae prepare shards`, `python -m data_prep.shards`).

    Args:
        input: files or folders (.txt, .jsonl[.gz|.xz], .parquet).
        output: shard folder to create (gets train/, val/, manifest.json).
        tokenizer: tokenizer.json (see data_prep.tokenizer); or train one with --vocab_size.
        vocab_size: train a tokenizer (paper App. R) on the training split's documents first.
        max_chars: tokenizer training: character budget (paper 2e9).
        max_doc_chars: tokenizer training: per-document cap (10,000).
        text_field: JSONL field / Parquet column with the text.
        id_field: JSONL field / Parquet column with document ids.
        val_fraction: share of documents held out (by id hash).
        val_ids: comma-separated document ids to hold out instead.
        test_fraction: share of documents held out as a test split (by id hash; `parcae test` uses it).
        seed: seed of the id hash that assigns splits.
        num_workers: tokenizing processes.
        chunk_tokens: tokens per LitData chunk.
        decode_errors: undecodable UTF-8: stop (error) or replace and count.
        overwrite: rebuild an existing shard folder.
    """
    if (tokenizer is None) == (vocab_size is None):
        raise UsageError("give either --tokenizer or --vocab_size (to train one)")
    held_out = [x for x in val_ids.split(",") if x]
    try:
        tokenizer = tokenizer or train_split_tokenizer(
            input, Path(output).with_name(Path(output).name + "_tokenizer.json"), vocab_size,
            text_field=text_field, id_field=id_field, val_fraction=val_fraction, val_ids=held_out, seed=seed,
            decode_errors=decode_errors, max_chars=max_chars, max_doc_chars=max_doc_chars,
            test_fraction=test_fraction)
        return prepare_shards(input, output, tokenizer, text_field=text_field, id_field=id_field,
                              val_fraction=val_fraction, val_ids=held_out, seed=seed, num_workers=num_workers,
                              chunk_tokens=chunk_tokens, decode_errors=decode_errors, overwrite=overwrite,
                              test_fraction=test_fraction)
    except ShardError as err:
        raise UsageError(str(err)) from None


def main(argv: Optional[list[str]] = None) -> None:
    from parcae.command_line import run_main

    run_main("prepare shards", shards_command, argv)


if __name__ == "__main__":
    main()
