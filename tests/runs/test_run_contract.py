"""Runs own the run: one checkpoint format with one writer (trained and imported runs hold the same keys), one rule
for which checkpoint a run directory means (every verb that takes --ckpt_path accepts the directory, sweeps pass
it), one rule for where results go (into the run directory), and no checkpoint cache shared between callers."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import SHAKESPEARE_TOKENIZER, write_recipe
from parcae.runs import (LIGHTNING_KEYS, PARCAE_KEY, PARCAE_STATE_KEYS, check_checkpoint, lightning_checkpoint,
                         open_checkpoint, results_dir_for, save_atomically)

ROOT = Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "tests" / "assets" / "core_bundle"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_shards):
    """A two-step fit: its run directory (last.ckpt, config.yaml, tokenizer.json)."""
    from parcae.cli import main

    root = tmp_path_factory.mktemp("contract")
    main(["fit", "--config", str(write_recipe(root / "tiny.yaml", small_shards, root / "runs", max_steps=2))])
    return root / "runs" / "tiny"


@pytest.fixture
def imported_run(tmp_path, tiny_config):
    """A run directory as ``parcae import`` writes one: lightning_checkpoint of a model, and its tokenizer."""
    from parcae.model import LoopedLM

    torch.manual_seed(0)
    model = LoopedLM(tiny_config(vocab_size=4096, block_size=64, mean_recurrence=2)).eval()
    run = tmp_path / "runs" / "imported"
    run.mkdir(parents=True)
    save_atomically(lightning_checkpoint(model), run / "last.ckpt")
    shutil.copy(SHAKESPEARE_TOKENIZER, run / "tokenizer.json")
    return run


# -- one writer ------------------------------------------------------------------------------------------------
def test_trained_and_imported_checkpoints_hold_the_same_keys(trained, tiny_config):
    from parcae.model import LoopedLM

    fitted = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=True)
    imported = lightning_checkpoint(LoopedLM(tiny_config()))
    for ckpt in (fitted, imported):
        assert set(LIGHTNING_KEYS) | {PARCAE_KEY} <= set(ckpt)
        assert tuple(ckpt[PARCAE_KEY]) == PARCAE_STATE_KEYS
    assert set(imported) == set(LIGHTNING_KEYS) | {PARCAE_KEY}  # nothing of its own beyond the format
    assert fitted[PARCAE_KEY]["world_size"] == 1 and fitted[PARCAE_KEY]["micro_step"] == 2
    assert imported[PARCAE_KEY] == {"micro_step": 0, "skipped_steps": 0, "nonfinite_streak": 0, "world_size": None}


def test_extra_entries_cannot_replace_the_format(tiny_config):
    from parcae.model import LoopedLM

    with pytest.raises(ValueError, match="parcae"):
        lightning_checkpoint(LoopedLM(tiny_config()), extra={PARCAE_KEY: {}})
    assert lightning_checkpoint(LoopedLM(tiny_config()), extra={"imported": {"source": "x"}})["imported"]


# -- no shared cache -------------------------------------------------------------------------------------------
def test_each_check_hands_out_its_own_checkpoint(imported_run):
    first = check_checkpoint(imported_run / "last.ckpt")
    first["hyper_parameters"]["arch"]["name"] = "changed by one caller"
    first["added"] = True
    second = check_checkpoint(imported_run / "last.ckpt")
    assert "added" not in second and second["hyper_parameters"]["arch"]["name"] == "tiny"


def test_open_checkpoint_returns_the_run_directory_choice_opened_once(imported_run, monkeypatch):
    save_atomically(torch.load(imported_run / "last.ckpt", weights_only=True) | {"global_step": 7},
                    imported_run / "step=0000007.ckpt")  # newer than last.ckpt (step 0): the rule picks it
    import parcae.runs.checkpoint as checkpoint

    loads = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a[0]) or real(*a, **k))
    path, ckpt = open_checkpoint(imported_run)
    assert path.name == "step=0000007.ckpt" and ckpt["global_step"] == 7
    assert loads.count(path) == 1  # chosen and handed back from the one opening
    loads.clear()
    run = checkpoint.load_checkpoint(imported_run)
    assert run.step == 7 and loads.count(path) == 1


# -- where results go ------------------------------------------------------------------------------------------
def test_results_go_into_the_run_directory(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "last.ckpt").write_bytes(b"x")
    assert results_dir_for(run) == (run, None)                 # a run directory: inside it, not its parent
    assert results_dir_for(run / "last.ckpt") == (run, None)   # a checkpoint: its folder
    sharded = run / "step=0000004.ckpt"
    sharded.mkdir()
    (sharded / "meta.pt").write_bytes(b"x")
    assert results_dir_for(sharded) == (run, None)             # a sharded checkpoint folder: the run around it
    assert results_dir_for(run, tmp_path / "out") == (tmp_path / "out", None)
    run.chmod(0o555)
    try:
        where, note = results_dir_for(run)
        if where is None:  # root may write anywhere; elsewhere the read-only folder is refused with a note
            assert "not writable" in note and str(run) in note
    finally:
        run.chmod(0o755)


def test_no_verb_derives_the_results_folder_itself():
    found = [f"{p.relative_to(ROOT)}:{n}" for p in (ROOT / "parcae").rglob("*.py")
             for n, line in enumerate(p.read_text().splitlines(), 1)
             if re.search(r"Path\((args\.)?ckpt_path\)\.parent", line)]
    assert not found, found


# -- every verb that takes --ckpt_path takes a run directory ---------------------------------------------------
def test_perplexity_and_core_of_a_run_directory_write_inside_it(imported_run, tmp_path):
    from parcae.cli import main

    text = tmp_path / "sample.txt"
    text.write_text("To be, or not to be, that is the question. " * 4)
    main(["perplexity", "--ckpt_path", str(imported_run), "--text", str(text), "--loops", "1,2", "--device", "cpu"])
    written = json.loads((imported_run / "perplexity_sample.json").read_text())
    assert written["checkpoint"] == str(imported_run / "last.ckpt") and len(written["results"]) == 2
    main(["core", "--ckpt_path", str(imported_run), "--bundle", str(BUNDLE), "--tasks", str(BUNDLE / "core.yaml"),
          "--loops", "2", "--seeds", "1234", "--device", "cpu"])
    assert (imported_run / "core_T2.json").is_file()
    assert not list(imported_run.parent.glob("*.json"))  # nothing beside the run directory


def test_validate_test_and_predict_take_a_run_directory(trained, capsys):
    from parcae.cli import main

    assert not (trained / "test_loops.json").exists()
    main(["test", "--ckpt_path", str(trained), "--loops", "1,2"])
    results = json.loads((trained / "test_loops.json").read_text())
    assert results["global_step"] == 2 and [r["loops"] for r in results["results"]] == [1, 2]
    assert not (trained.parent / "test_loops.json").exists()
    main(["validate", f"--ckpt_path={trained}"])
    assert "val/loss" in capsys.readouterr().out
    main(["predict", "--ckpt_path", str(trained), "--prompt", "alpha beta", "--loops", "2", "--max_new_tokens", "3",
          "--temperature", "0"])
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("alpha beta")


def test_a_sweep_tests_its_runs_by_run_directory(trained):
    from parcae.cli import main
    from parcae.experiments.sweep import Run

    args = Run(name=trained.name, recipe=trained / "config.yaml", overrides={}, test_loops="3").test_args(
        str(trained.parent))
    assert args[args.index("--ckpt_path") + 1] == str(trained)  # the run, not a file name it guesses
    main(args)
    assert [r["loops"] for r in json.loads((trained / "test_loops.json").read_text())["results"]] == [3]


def test_a_run_directory_without_a_loadable_checkpoint_is_one_line(tmp_path):
    from parcae.cli import main

    (tmp_path / "empty_run").mkdir()
    with pytest.raises(SystemExit) as info:
        main(["test", "--ckpt_path", str(tmp_path / "empty_run")])
    assert "has no checkpoint that loads" in str(info.value) and "\n" not in str(info.value)


# -- loading without initializing what the checkpoint replaces ----------------------------------------------------
def test_loading_skips_the_initialization_and_gives_the_same_model(imported_run, monkeypatch):
    """load_checkpoint builds the model without its (orthogonal, QR-heavy) initialization, which was most of a
    one-token `parcae generate`; the model is the one LoopedLM(config) + load_state_dict gives, output for output."""
    import parcae.model.looped as looped
    from parcae.model import LoopedLM, ModelConfig
    from parcae.runs import load_checkpoint

    ckpt = check_checkpoint(imported_run / "last.ckpt")
    reference = LoopedLM(ModelConfig(**ckpt["hyper_parameters"]["arch"])).eval()
    reference.load_state_dict({k[len("net."):]: v for k, v in ckpt["state_dict"].items()})

    def refuse(*args, **kwargs):
        raise AssertionError("load_checkpoint initialized weights it then replaced")

    monkeypatch.setattr(looped, "initialize", refuse)
    model = load_checkpoint(imported_run).model
    assert all(isinstance(p, torch.nn.Parameter) and p.requires_grad for p in model.parameters())
    ids = torch.randint(0, 4000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    assert torch.equal(model.rope, reference.rope)
