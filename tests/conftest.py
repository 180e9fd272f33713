"""Shared test helpers. Everything runs on CPU in fp32, offline, with tiny models (d <= 64)."""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

ASSETS = Path(__file__).parent / "assets"
OFFICIAL_FIXTURES = sorted((ASSETS / "official").glob("official_*.pt"))


@pytest.fixture
def tiny_config():
    """A factory for tiny model configs: 2 layers of d=64 by default, overridable per test."""
    from parcae.model import ModelConfig

    def make(**overrides):
        base = dict(name="tiny", vocab_size=128, block_size=32, d_model=64, n_heads=4, d_ff=128,
                    n_prelude=1, n_recurrent=1, n_coda=1, mean_recurrence=4, backprop_depth=2)
        base.update(overrides)
        return ModelConfig(**base)

    return make


SHAKESPEARE_TOKENIZER = Path(__file__).parent.parent / "data_prep" / "corpus" / "shakespeare_tokenizer.json"


def write_jsonl(path, texts, ids=None):
    """Write documents as JSON lines (optionally with an "id" field); returns the path."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            record = {"text": text} if ids is None else {"id": ids[i], "text": text}
            f.write(json.dumps(record) + "\n")
    return path


def synthetic_documents(n, seed=0, words=("alpha", "beta", "gamma", "delta", "omega", "lorem", "ipsum")):
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + f" doc{i}." for i in range(n)]


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory):
    """A shard folder of 400 synthetic documents (~25k tokens), small chunks, 1 worker."""
    from data_prep.shards import prepare_shards

    root = tmp_path_factory.mktemp("small_shards")
    src = write_jsonl(root / "src" / "docs.jsonl", synthetic_documents(400))
    prepare_shards([src], root / "shards", SHAKESPEARE_TOKENIZER, val_fraction=0.1, chunk_tokens=1024,
                   num_workers=1, quiet=True)
    return root / "shards"
