"""An imported release is evaluated with its own tokenizer and no training data: `parcae perplexity --text`,
`parcae predict` and `parcae core` read the run directory's tokenizer; `parcae test` takes shard folders only when
they were tokenized with exactly that tokenizer (sha256)."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import ASSETS, synthetic_documents, write_jsonl
from parcae.cli import main
from parcae.data import load_tokenizer
from parcae.runs import load_checkpoint

RELEASE = ASSETS / "official_snapshots" / "parcae_tiny"
TEXT = "The quick brown fox jumps over the lazy dog. Then it rests in the shade of an old tree."


@pytest.fixture
def run(tmp_path):
    """A fresh import of the Parcae snapshot (each test may rewrite the run's config.yaml, as every verb does)."""
    main(["import", str(RELEASE), "--runs_dir", str(tmp_path / "runs"), "--run_name", "parcae"])
    return tmp_path / "runs" / "parcae"


def _fail(argv, *needles):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = str(exit_.value.code)
    assert exit_.value.code not in (0, None) and "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_perplexity_of_a_text_uses_the_imported_tokenizer(run, tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    main(["perplexity", "--ckpt_path", str(run / "last.ckpt"), "--text", str(tmp_path / "text.txt"), "--loops", "1,4",
          "--device", "cpu"])
    rows = json.loads((run / "perplexity_text.json").read_text())["results"]
    # Independently: the whole text fits one window, so the NLL is one forward over <|bos|> + tokens, scoring each
    # next token (the like-init state noise depends on the sequence length, so the forward sees the whole text).
    tok = load_tokenizer(str(RELEASE / "tokenizer.json"))
    ids = torch.tensor([[tok.token_to_id("<|bos|>"), *tok.encode(TEXT, add_special_tokens=False).ids]])
    assert ids.shape[1] <= 64
    model = load_checkpoint(run / "last.ckpt").model
    for row, loops in zip(rows, (1, 4)):
        with torch.no_grad():
            logits = model(ids, loops=loops, state_seed=[0]).logits[0, :-1, :model.config.vocab_size]
        nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        assert row["loops"] == loops and row["tokens"] == ids.shape[1] - 1
        assert row["nll"] == pytest.approx(nll, rel=1e-5)


def test_predict_generates_with_the_imported_tokenizer(run, capsys):
    main(["predict", "--ckpt_path", str(run / "last.ckpt"), "--prompt", "The fox", "--loops", "4",
          "--max_new_tokens", "6", "--temperature", "0", "--trainer.accelerator", "cpu"])
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    # Independently: greedy decoding with the checkpoint's model and the release's tokenizer.
    tok = load_tokenizer(str(RELEASE / "tokenizer.json"))
    model = load_checkpoint(run / "last.ckpt").model
    ids = [tok.token_to_id("<|bos|>"), *tok.encode("The fox", add_special_tokens=False).ids]
    for _ in range(6):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), loops=4).logits[0, -1, :model.config.vocab_size]
        ids.append(int(logits.argmax()))
        if ids[-1] == tok.token_to_id("<|eos|>"):
            break
    assert printed == tok.decode(ids, skip_special_tokens=True)


def test_generate_runs_on_an_imported_run_with_its_own_tokenizer(run, capsys):
    """parcae generate on the imported run, no data folder: the greedy continuation of the checkpoint's own model
    decoded with the release's tokenizer (the engine's cached steps = the full forward, checked independently)."""
    main(["generate", "--ckpt_path", str(run / "last.ckpt"), "--prompt", "The fox", "--loops", "4",
          "--max_new_tokens", "6", "--temperature", "0"])
    printed = capsys.readouterr().out.strip()
    tok = load_tokenizer(str(RELEASE / "tokenizer.json"))
    model = load_checkpoint(run / "last.ckpt").model
    ids = [tok.token_to_id("<|bos|>"), *tok.encode("The fox", add_special_tokens=False).ids]
    n_prompt = len(ids)
    for _ in range(6):
        with torch.no_grad():
            logits = model(torch.tensor([ids]), loops=4).logits[0, -1, :model.config.vocab_size]
        ids.append(int(logits.argmax()))
        if ids[-1] == tok.token_to_id("<|eos|>"):
            break
    # a character whose bytes the last tokens only began is never printed (parcae.data.tokenizer.TextStream)
    assert printed == ("The fox" + tok.decode(ids[n_prompt:], skip_special_tokens=True)).rstrip("\ufffd").strip()


def test_core_runs_with_the_imported_tokenizer(run, tmp_path):
    from parcae.eval.core import CoreScorer, load_tasks

    bundle = ASSETS / "core_bundle"
    out = tmp_path / "core.json"
    main(["core", "--ckpt_path", str(run / "last.ckpt"), "--bundle", str(bundle), "--tasks", str(bundle / "core.yaml"),
          "--seeds", "1234", "--max_per_task", "3", "--loops", "2", "--device", "cpu", "--out", str(out)])
    model = load_checkpoint(run / "last.ckpt").model
    expected = CoreScorer(model, load_tokenizer(str(RELEASE / "tokenizer.json")), loops=2).evaluate(
        bundle, load_tasks(str(bundle / "core.yaml")), (1234,), 3, progress=False)
    assert json.loads(out.read_text())["tasks"] == json.loads(json.dumps(expected["tasks"]))


def test_test_accepts_shards_made_with_the_imported_tokenizer_only(run, tmp_path, small_shards):
    from data_prep.shards import prepare_shards

    own = tmp_path / "own_shards"
    source = write_jsonl(tmp_path / "src" / "docs.jsonl", synthetic_documents(60))
    prepare_shards([source], own, run / "tokenizer.json", val_fraction=0.3, chunk_tokens=1024, quiet=True)
    common = ["--data.num_workers", "0", "--data.batch_size", "2", "--trainer.limit_test_batches", "1",
              "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"]
    # small_shards were tokenized with the Shakespeare tokenizer: refused, naming both hashes' owners.
    _fail(["test", "--ckpt_path", str(run / "last.ckpt"), "--data.datasets", f"[{small_shards}]", *common],
          str(small_shards), "another tokenizer", str(run / "tokenizer.json"))
    main(["test", "--ckpt_path", str(run / "last.ckpt"), "--data.datasets", f"[{own}]", "--loops", "1,4", *common])
    results = json.loads((run / "test_loops.json").read_text())["results"]
    assert [r["loops"] for r in results] == [1, 4] and all(r["loss"] > 0 for r in results)


def test_test_without_shards_says_how_to_make_them(run):
    _fail(["test", "--ckpt_path", str(run / "last.ckpt"), "--trainer.accelerator", "cpu"],
          "--data.datasets", f"--tokenizer {run / 'tokenizer.json'}")
