"""Shared test helpers. Everything runs on CPU in fp32, offline, with tiny models (d <= 64)."""

import os
from pathlib import Path

# One BLAS thread for numpy/scipy (set before they load OpenBLAS; subprocesses inherit it). The loss-by-loops fit
# that every `parcae test` writes runs ~300 tiny L-BFGS problems: with OpenBLAS's two spinning threads on a busy
# 2-core machine they took 85 s of a 90 s `parcae test`, with one thread 4 s. Torch keeps its own threads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

try:  # numpy loaded before this file (a plugin): limit the pool it already started
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")
except ImportError:
    pass

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # lm-eval / datasets: local files only, never the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
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


@pytest.fixture
def one_thread():
    """Token-at-a-time generation is many tiny ops: one thread is several times faster than two on a shared CPU.
    Inference test modules use it for every test (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def perturb_weights(model, scale=0.05):
    """The scaled-zero init starts output projections at 0: give every weight some signal (in place)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


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


TINY_ARCH = dict(name="tiny-parcae", vocab_size=4096, block_size=32, d_model=32, n_heads=2, d_ff=64, n_prelude=1,
                 n_recurrent=1, n_coda=1, mean_recurrence=3, backprop_depth=2)


def write_recipe(path, data_dir, runs_dir, run_name="tiny", max_steps=12, arch=None, extra=""):
    """A complete tiny CLI recipe (CPU, d=32, seq 32, batch 4) over ``data_dir``."""
    import yaml

    recipe = {
        "seed_everything": 1234, "run_name": run_name, "runs_dir": str(runs_dir), "checkpoint_every": 4,
        "val_every": 6,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true", "max_steps": max_steps,
                    "gradient_clip_val": 1.0, "log_every_n_steps": 1, "limit_val_batches": 2,
                    "limit_test_batches": 2, "num_sanity_val_steps": 0, "enable_progress_bar": False},
        "model": {"arch": {**TINY_ARCH, **(arch or {})}, "optimizer": {"name": "adamw", "lr": 0.003},
                  "schedule": {"name": "trapezoid"}, "eval_loops": [1, 2], "telemetry_every": 2},
        "data": {"datasets": [str(data_dir)], "seq_len": 32, "batch_size": 4, "num_workers": 0},
    }
    path.write_text(yaml.safe_dump(recipe, sort_keys=False) + extra)
    return path


def free_port() -> int:
    """A TCP port nothing listens on now (for torchrun's --master_port, servers): tests never share a fixed port,
    so two of them can run at the same time."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_shards):
    """One tiny 12-step run (``write_recipe``'s defaults: checkpoints at steps 4, 8, 12) trained once per session
    and shared by the files that need a trained run: (root, recipe, run directory). Read it, or evaluate it (results
    land beside its checkpoints); a test that changes the run (resumes, damages a file) works on a copy."""
    from parcae.cli import main

    root = tmp_path_factory.mktemp("tiny_run")
    recipe = write_recipe(root / "tiny.yaml", small_shards, root / "runs")
    main(["fit", "--config", str(recipe)])
    run_dir = root / "runs" / "tiny"
    assert (run_dir / "step=0000012.ckpt").is_file()
    return root, recipe, run_dir


def copy_run(run_dir, tmp_path, data_dir):
    """A private copy of a run under ``tmp_path/runs`` and a recipe naming it (same name, same data): (recipe,
    copied run directory)."""
    import shutil

    runs = tmp_path / "runs"
    shutil.copytree(run_dir, runs / run_dir.name)
    return write_recipe(tmp_path / f"{run_dir.name}.yaml", data_dir, runs, run_name=run_dir.name), runs / run_dir.name


def write_choice_task(folder, name, items, metrics=("acc",)):
    """A local lm-eval multiple-choice task ``name`` in ``folder`` (for ``TaskManager(include_path=folder)``):
    one JSON line per (query, choices, gold) item."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"query": q, "choices": c, "gold": g}) + "\n" for q, c, g in items))
    metric_list = "".join(f"  - metric: {m}\n" for m in metrics)
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{gold}}"\n'
        f"metric_list:\n{metric_list}")
