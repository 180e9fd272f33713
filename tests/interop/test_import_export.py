"""`parcae import` / `parcae export` against folders written by the official code (tests/assets/official_snapshots,
see its README): logits through the written run directory equal the official logits, export/import round trips are
exact, and bad input gives one line, a non-zero exit and nothing written."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ASSETS
from parcae.cli import main
from parcae.runs import load_checkpoint
from parcae.interop import write_run
from parcae.interop.release import official_config_json
from parcae.model import LoopedLM, ModelConfig, to_official

SNAPSHOTS = ASSETS / "official_snapshots"
RELEASES = {"parcae_tiny": "pytorch_model.bin", "gpt_tiny": "model.pt"}


def _run(argv):
    """main(argv); returns the exit message (None on success)."""
    try:
        main(argv)
    except SystemExit as exit_:
        assert exit_.code not in (0, None), "a failing command must exit non-zero"
        return str(exit_.code)
    return None


def _one_line_error(argv, *needles):
    message = _run(argv)
    assert message is not None, f"{argv} should have failed"
    assert "\n" not in message and message.startswith(f"parcae {argv[0]}: error: "), message
    for needle in needles:
        assert needle in message, message
    return message


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """Each snapshot folder imported once through the CLI: {name: run directory}."""
    runs = tmp_path_factory.mktemp("imported")
    for name in RELEASES:
        assert _run(["import", str(SNAPSHOTS / name), "--runs_dir", str(runs)]) is None
    return {name: runs / name for name in RELEASES}


@pytest.mark.parametrize("name", list(RELEASES))
def test_imported_checkpoint_reproduces_the_official_logits_at_every_stored_depth(imported, name):
    run = imported[name]
    assert {"last.ckpt", "config.yaml", "tokenizer.json", "import.json"} <= {p.name for p in run.iterdir()}
    loaded = load_checkpoint(run / "last.ckpt")  # the written file, not the in-memory model
    model = loaded.model
    assert loaded.tokenizer_path == run / "tokenizer.json"
    reference = torch.load(SNAPSHOTS / f"{name}_reference.pt", weights_only=False)
    assert model.config.looped == (name == "parcae_tiny")
    assert set(reference["logits"]) == ({1, 4, 9} if model.config.looped else {1})
    for loops, expected in reference["logits"].items():
        with torch.no_grad():
            logits = model(reference["input_ids"], loops=loops if model.config.looped else None,
                           initial_state=reference["h0"]).logits
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_import_prints_the_summary_and_next_commands(tmp_path, capsys):
    assert _run(["import", str(SNAPSHOTS / "parcae_tiny"), "--runs_dir", str(tmp_path), "--run_name", "p"]) is None
    out = capsys.readouterr().out
    model = load_checkpoint(tmp_path / "p" / "last.ckpt").model
    counts = model.parameter_counts()
    assert f"{counts['total']:,} parameters" in out and f"recurrent {counts['recurrent']:,}" in out
    assert "μ_rec = 4" in out and "μ_bwd = 2" in out
    assert f"parcae perplexity --ckpt_path {tmp_path / 'p' / 'last.ckpt'}" in out
    assert f"--tokenizer {tmp_path / 'p' / 'tokenizer.json'}" in out
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no staging folder left behind


@pytest.mark.parametrize("name", list(RELEASES))
def test_export_of_an_imported_release_gives_back_the_official_files(imported, tmp_path, name):
    out = tmp_path / "exported"
    assert _run(["export", "--format", "official", str(imported[name]), str(out)]) is None
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.pt", "tokenizer.json"]
    assert json.loads((out / "config.json").read_text()) == json.loads((SNAPSHOTS / name / "config.json").read_text())
    original = torch.load(SNAPSHOTS / name / RELEASES[name], weights_only=True)
    exported = torch.load(out / "model.pt", weights_only=True)
    assert exported.keys() == original.keys()
    for key in original:
        if name == "gpt_tiny" and key == "lm_head.weight":
            # The official GPT (use_fused_head="") owns an untied [V, d] head that its forward never reads; the
            # import drops it and the export writes the embedding in its place.
            assert exported[key].shape == original[key].shape
            continue
        assert torch.equal(exported[key], original[key]), key
    assert (out / "tokenizer.json").read_bytes() == (SNAPSHOTS / name / "tokenizer.json").read_bytes()


def _random_run(root, name, tokenizer=SNAPSHOTS / "parcae_tiny" / "tokenizer.json", **arch):
    torch.manual_seed(len(name))
    cfg = ModelConfig(**{**dict(name=name, vocab_size=512, block_size=64, d_model=64, n_heads=2, d_ff=128,
                                n_prelude=1, n_recurrent=2, n_coda=1, mean_recurrence=4, backprop_depth=2), **arch})
    model = LoopedLM(cfg)
    with torch.no_grad():  # no zero-initialised parameter may hide a misplaced tensor
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    write_run(model, root / name, {"tokenizer.json": Path(tokenizer)})
    return root / name


def _state(run):
    return torch.load(run / "last.ckpt", weights_only=False)["state_dict"]


@pytest.mark.parametrize("arch", [{"injection": "diagonal"}, {"injection": "concat"}, {"injection": "add"},
                                  {"injection": "none", "n_prelude": 3, "n_recurrent": 0, "n_coda": 0}],
                         ids=lambda a: a["injection"])
def test_import_of_export_reproduces_the_state_dict_exactly(tmp_path, arch):
    run = _random_run(tmp_path, f"run-{arch['injection']}", **arch)
    assert _run(["export", str(run), str(tmp_path / "official")]) is None
    config = json.loads((tmp_path / "official" / "config.json").read_text())
    assert config["_class_name"] == ("GPTConfig" if arch["injection"] == "none" else "ParcaeConfig")
    assert _run(["import", str(tmp_path / "official"), "--runs_dir", str(tmp_path), "--run_name", "back"]) is None
    before, after = _state(run), _state(tmp_path / "back")
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    def arch(path):  # n_kv_heads None means n_heads; the official GPT registry wants names starting with "gpt";
        cfg = load_checkpoint(path / "last.ckpt").config  # a GPT has no loop settings to carry
        cfg = cfg.replace(n_kv_heads=cfg.kv_heads, name=cfg.name.removeprefix("gpt-"))
        return cfg if cfg.looped else cfg.replace(mean_recurrence=1, backprop_depth=1)

    assert arch(tmp_path / "back") == arch(run)


# -- bad input: one line, non-zero exit, nothing written ----------------------------------------------------------
def _copy_release(tmp_path, name="parcae_tiny"):
    folder = tmp_path / "release"
    shutil.copytree(SNAPSHOTS / name, folder)
    return folder


def _nothing_written(runs):
    assert not runs.exists() or not any(runs.iterdir()), list(runs.iterdir())


def test_import_refuses_a_missing_folder(tmp_path):
    _one_line_error(["import", str(tmp_path / "nope"), "--runs_dir", str(tmp_path / "runs")], "no such folder")
    _nothing_written(tmp_path / "runs")


def test_import_refuses_a_folder_without_config_json(tmp_path):
    folder = _copy_release(tmp_path)
    (folder / "config.json").unlink()
    _one_line_error(["import", str(folder), "--runs_dir", str(tmp_path / "runs")], "has no config.json")
    _nothing_written(tmp_path / "runs")


def test_import_refuses_an_unknown_class_name(tmp_path):
    folder = _copy_release(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["_class_name"] = "LlamaConfig"
    (folder / "config.json").write_text(json.dumps(config))
    _one_line_error(["import", str(folder), "--runs_dir", str(tmp_path / "runs")], "_class_name='LlamaConfig'")
    _nothing_written(tmp_path / "runs")


def test_import_refuses_unplaceable_keys_by_name(tmp_path):
    folder = _copy_release(tmp_path)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["transformer.core_block.7.attn.c_q.weight"] = torch.zeros(64, 64)
    torch.save(state, folder / "pytorch_model.bin")
    _one_line_error(["import", str(folder), "--runs_dir", str(tmp_path / "runs")],
                    "cannot place", "transformer.core_block.7.attn.c_q.weight")
    _nothing_written(tmp_path / "runs")


def test_import_of_a_hub_id_offline_is_one_line(tmp_path):
    _one_line_error(["import", "SandyResearch/parcae-140m", "--runs_dir", str(tmp_path / "runs")],
                    "SandyResearch/parcae-140m", "HF_HUB_OFFLINE")
    _nothing_written(tmp_path / "runs")


def test_import_refuses_a_tokenizer_without_bos(tmp_path):
    text = (SNAPSHOTS / "parcae_tiny" / "tokenizer.json").read_text().replace("<|bos|>", "<|start|>")
    (tmp_path / "tok.json").write_text(text)
    _one_line_error(["import", str(SNAPSHOTS / "parcae_tiny"), "--tokenizer", str(tmp_path / "tok.json"),
                     "--runs_dir", str(tmp_path / "runs")], "<|bos|>")
    _nothing_written(tmp_path / "runs")


def test_import_and_export_refuse_an_existing_non_empty_target(imported, tmp_path):
    runs = tmp_path / "runs"
    (runs / "parcae_tiny").mkdir(parents=True)
    (runs / "parcae_tiny" / "keep.txt").write_text("mine")
    _one_line_error(["import", str(SNAPSHOTS / "parcae_tiny"), "--runs_dir", str(runs)], "already exists")
    assert [p.name for p in (runs / "parcae_tiny").iterdir()] == ["keep.txt"]
    _one_line_error(["export", str(imported["parcae_tiny"]), str(runs / "parcae_tiny")], "already exists")
    assert [p.name for p in (runs / "parcae_tiny").iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in runs.iterdir()) == ["parcae_tiny"]


def test_export_refuses_what_the_official_code_cannot_represent(tmp_path):
    run = _random_run(tmp_path, "zoh", injection="diagonal_zoh")
    _one_line_error(["export", str(run), str(tmp_path / "out")], "diagonal_zoh")
    run = _random_run(tmp_path, "rdm", block="sandwich", mlp="swiglu", value_embeddings=False, injection="concat")
    _one_line_error(["export", str(run), str(tmp_path / "out")], "sandwich")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out*"))


def _disagreeing_release(tmp_path):
    """An official folder whose value-embedding tables and gates disagree (odd R: P/R/C 1/1/1, μ_bwd 2)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="odd", vocab_size=512, block_size=64, d_model=64, n_heads=2, d_ff=128, n_prelude=1,
                      n_recurrent=1, n_coda=1, mean_recurrence=4, backprop_depth=2)
    model = LoopedLM(cfg)
    folder = tmp_path / "odd"
    folder.mkdir()
    state, _ = to_official(model)
    torch.save(state, folder / "model.pt")
    (folder / "config.json").write_text(json.dumps(official_config_json(model)))
    shutil.copyfile(SNAPSHOTS / "parcae_tiny" / "tokenizer.json", folder / "tokenizer.json")
    return folder, model


def test_value_embedding_tables_and_gates_that_disagree_are_refused_naming_the_key(tmp_path):
    # Official: tables on blocks i % 2 == (3 - 1) % 2 -> {0, 2}; gates by layer id (0, 1, 1 + 1·4 = 5) against
    # n_layer = R·μ_bwd = 2 -> odd ids -> blocks {1, 2}. Block 0's table has no gate: the official model never reads it.
    folder, model = _disagreeing_release(tmp_path)
    _one_line_error(["import", str(folder), "--runs_dir", str(tmp_path / "runs")],
                    "value_embeds.0.weight", "n_layer = R·μ_bwd = 1·2 = 2")
    _nothing_written(tmp_path / "runs")
    write_run(model, tmp_path / "runs" / "odd", {"tokenizer.json": folder / "tokenizer.json"})
    _one_line_error(["export", str(tmp_path / "runs" / "odd"), str(tmp_path / "out")], "value embeddings")
    assert not (tmp_path / "out").exists()
