"""Shard preparation: exact contents (BOS/EOS, no padding), manifest, split, idempotence, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import SHAKESPEARE_TOKENIZER, synthetic_documents, write_jsonl
from data_prep.shards import ShardError, ShardOptions, prepare_shards, split_of
from parcae.data.tokenizer import file_sha256, load_tokenizer


def read_all_tokens(split_dir):
    from litdata import StreamingDataset, TokensLoader

    ds = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=1), shuffle=False)
    return torch.cat([ds[i] for i in range(len(ds))]).tolist()


def expected_stream(texts, tok):
    out = []
    for text in texts:
        out += [0, *tok.encode(text, add_special_tokens=False).ids, 1]
    return out


def test_shards_hold_exactly_the_documents_wrapped_in_bos_eos(tmp_path):
    texts = synthetic_documents(60, seed=3)
    ids = [f"d{i}" for i in range(60)]
    src = write_jsonl(tmp_path / "docs.jsonl", texts, ids)
    val_ids = ("d3", "d17", "d42")
    manifest = prepare_shards([src], tmp_path / "out", SHAKESPEARE_TOKENIZER, id_field="id", val_ids=val_ids,
                              chunk_tokens=100_000, quiet=True)
    tok = load_tokenizer(str(SHAKESPEARE_TOKENIZER))
    train_texts = [t for i, t in zip(ids, texts) if i not in val_ids]
    val_texts = [t for i, t in zip(ids, texts) if i in val_ids]
    assert read_all_tokens(tmp_path / "out" / "train") == expected_stream(train_texts, tok)
    assert read_all_tokens(tmp_path / "out" / "val") == expected_stream(val_texts, tok)
    assert 2 not in read_all_tokens(tmp_path / "out" / "train")  # no padding anywhere
    assert manifest["splits"]["train"]["documents"] == 57 and manifest["splits"]["val"]["documents"] == 3
    assert manifest["splits"]["train"]["tokens"] == len(expected_stream(train_texts, tok))


def test_manifest_records_counts_tokenizer_sources_and_date(small_shards):
    manifest = json.loads((small_shards / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 4096
    assert manifest["tokenizer"]["sha256"] == file_sha256(SHAKESPEARE_TOKENIZER)
    assert file_sha256(small_shards / "tokenizer.json") == manifest["tokenizer"]["sha256"]
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 400
    assert 20 <= manifest["splits"]["val"]["documents"] <= 60  # ~10% by seeded hash
    assert manifest["sources"][0]["path"].endswith("docs.jsonl") and manifest["created"].endswith("Z")
    for split in ("train", "val"):
        index = json.loads((small_shards / split / "index.json").read_text())
        assert sum(c["dim"] for c in index["chunks"]) == manifest["splits"][split]["tokens"]


def test_split_is_by_document_and_seeded():
    opts = ShardOptions(tokenizer="t", val_fraction=0.2, seed=1)
    a = [split_of(f"doc{i}", opts) for i in range(2000)]
    assert a == [split_of(f"doc{i}", opts) for i in range(2000)]
    assert 0.17 < a.count("val") / 2000 < 0.23
    b = [split_of(f"doc{i}", ShardOptions(tokenizer="t", val_fraction=0.2, seed=2)) for i in range(2000)]
    assert a != b
    # a test split takes the next slice of the hash range: validation keeps exactly the same documents
    c = [split_of(f"doc{i}", ShardOptions(tokenizer="t", val_fraction=0.2, seed=1, test_fraction=0.1))
         for i in range(2000)]
    assert [i for i, s in enumerate(c) if s == "val"] == [i for i, s in enumerate(a) if s == "val"]
    assert 0.08 < c.count("test") / 2000 < 0.12


def test_a_held_out_test_split_is_written_and_used_by_parcae_test(tmp_path):
    from parcae.data.datamodule import TokenDataModule

    texts = synthetic_documents(120, seed=5)
    ids = [f"d{i}" for i in range(120)]
    src = write_jsonl(tmp_path / "docs.jsonl", texts, ids)
    manifest = prepare_shards([src], tmp_path / "out", SHAKESPEARE_TOKENIZER, id_field="id", val_fraction=0.2,
                              test_fraction=0.2, chunk_tokens=100_000, quiet=True)
    options = ShardOptions(tokenizer="t", val_fraction=0.2, test_fraction=0.2)
    tok = load_tokenizer(str(SHAKESPEARE_TOKENIZER))
    for split in ("train", "val", "test"):
        wanted = [t for i, t in zip(ids, texts) if split_of(i, options) == split]
        assert wanted and read_all_tokens(tmp_path / "out" / split) == expected_stream(wanted, tok)
    assert sum(manifest["splits"][s]["documents"] for s in ("train", "val", "test")) == 120
    assert TokenDataModule(datasets=[str(tmp_path / "out")]).test_split == "test"


def test_chunk_ends_lose_less_than_one_block_each(small_shards):
    from litdata import StreamingDataset, TokensLoader

    manifest = json.loads((small_shards / "manifest.json").read_text())
    block = 65
    ds = StreamingDataset(str(small_shards / "train"), item_loader=TokensLoader(block_size=block))
    readable = len(ds) * block
    total, chunks = manifest["splits"]["train"]["tokens"], manifest["splits"]["train"]["chunks"]
    assert chunks > 5
    assert total - chunks * (block - 1) <= readable <= total


def test_rerun_is_a_no_op_and_changes_need_overwrite(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl", synthetic_documents(30))
    out = tmp_path / "out"
    first = prepare_shards([src], out, SHAKESPEARE_TOKENIZER, val_fraction=0.2, quiet=True)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert prepare_shards([src], out, SHAKESPEARE_TOKENIZER, val_fraction=0.2, quiet=True) == first
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(ShardError, match="--overwrite"):
        prepare_shards([src], out, SHAKESPEARE_TOKENIZER, val_fraction=0.3, quiet=True)
    second = prepare_shards([src], out, SHAKESPEARE_TOKENIZER, val_fraction=0.3, overwrite=True, quiet=True)
    assert second["options"]["val_fraction"] == 0.3
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_parquet_input_with_text_column(tmp_path):
    texts = synthetic_documents(40, seed=5)
    pq.write_table(pa.table({"text": texts, "score": list(range(40))}), tmp_path / "part.parquet")
    manifest = prepare_shards([tmp_path / "part.parquet"], tmp_path / "out", SHAKESPEARE_TOKENIZER,
                              val_fraction=0.25, quiet=True)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 40


def _assert_nothing_left(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("case", ["empty_file", "undecodable", "missing_field", "missing_column", "no_such_path",
                                  "empty_folder", "not_json", "no_val_docs"])
def test_bad_input_gives_one_line_error_and_leaves_nothing(tmp_path, case):
    out = tmp_path / "out"
    kwargs = {}
    if case == "empty_file":
        (tmp_path / "empty.txt").write_bytes(b"")
        src, match = tmp_path / "empty.txt", "empty.txt: empty file"
    elif case == "undecodable":
        src = tmp_path / "bad.jsonl"
        src.write_bytes(b'{"text": "fine"}\n' * 5 + b'{"text": "caf\xe9 \xff bytes"}\n')
        src, match = src, r"bad.jsonl:6: 2 undecodable UTF-8 byte sequence"
        kwargs["val_fraction"] = 0.0001
    elif case == "missing_field":
        src = write_jsonl(tmp_path / "f.jsonl", ["a"])
        kwargs["text_field"] = "content"
        match = r"f.jsonl:1: no field 'content' \(fields: text\)"
    elif case == "missing_column":
        pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
        src, match = tmp_path / "p.parquet", r"p.parquet: no column 'text' \(columns: body\)"
    elif case == "no_such_path":
        src, match = tmp_path / "nope", "nope: no such file or folder"
    elif case == "empty_folder":
        (tmp_path / "dir").mkdir()
        src, match = tmp_path / "dir", "dir: folder contains no files"
    elif case == "not_json":
        src = tmp_path / "j.jsonl"
        src.write_text("{oops\n")
        match = r"j.jsonl:1: not valid JSON"
    else:
        src = write_jsonl(tmp_path / "few.jsonl", ["one document only"])
        kwargs["val_fraction"] = 0.0
        match = "no documents fell into the val split"
    with pytest.raises(ShardError, match=match) as info:
        prepare_shards([src], out, SHAKESPEARE_TOKENIZER, quiet=True, **kwargs)
    assert "\n" not in str(info.value)
    _assert_nothing_left(out)


def test_undecodable_bytes_are_counted_when_replaced(tmp_path):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "caf\xe9 \xff bytes"}\n' + b'{"text": "clean text"}\n' * 20)
    manifest = prepare_shards([src], tmp_path / "out", SHAKESPEARE_TOKENIZER, decode_errors="replace",
                              val_fraction=0.3, quiet=True)
    assert manifest["undecodable_sequences_replaced"] == 2


def test_missing_tokenizer_and_foreign_output_folder(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", synthetic_documents(10))
    with pytest.raises(ShardError, match="tokenizer file not found"):
        prepare_shards([src], tmp_path / "out", tmp_path / "nope.json", quiet=True)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(ShardError, match="not a complete shard folder"):
        prepare_shards([src], tmp_path / "taken", SHAKESPEARE_TOKENIZER, quiet=True)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"


def test_a_killed_run_leaves_nothing_that_looks_complete(tmp_path):
    src = write_jsonl(tmp_path / "big.jsonl", synthetic_documents(6000, seed=9))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "data_prep.shards", "--input", str(src), "--tokenizer", str(SHAKESPEARE_TOKENIZER),
           "--output", str(out), "--num_workers", "1", "--val_fraction", "0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while not list(tmp_path.glob(".out.partial-*/train")) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "preparation finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists() and not out.exists()
    manifest = prepare_shards([src], out, SHAKESPEARE_TOKENIZER, val_fraction=0.1, quiet=True)  # recovers
    assert manifest["splits"]["train"]["documents"] > 5000
    assert not list(tmp_path.glob(".out.partial-*"))


def test_one_command_trains_the_tokenizer_on_the_training_split_then_shards(tmp_path):
    from data_prep.shards import main, train_split_tokenizer

    texts = synthetic_documents(80, seed=11)
    ids = [f"d{i}" for i in range(80)]
    texts[5] = "qx" * 5000  # held out below: "qx" would be the most frequent pair if the tokenizer saw it
    src = write_jsonl(tmp_path / "docs.jsonl", texts, ids)
    main(["--input", str(src), "--output", str(tmp_path / "corpus"), "--vocab_size", "300", "--id_field", "id",
          "--val_ids", "d5,d9", "--num_workers", "1"])
    tok_path = tmp_path / "corpus_tokenizer.json"
    manifest = json.loads((tmp_path / "corpus" / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 300 and manifest["tokenizer"]["sha256"] == file_sha256(tok_path)
    assert manifest["splits"]["val"]["documents"] == 2
    assert load_tokenizer(str(tok_path)).token_to_id("qx") is None       # validation text never seen
    seen = train_split_tokenizer([src], tmp_path / "all.json", 300, id_field="id", val_ids=["d9"])
    assert load_tokenizer(str(seen)).token_to_id("qx") is not None        # ... while training on it learns it
