"""``parcae import`` reads a folder ``parcae export --format hf`` wrote: the state dict and ModelConfig come back
exactly, for every architecture; broken folders give one line and write nothing."""

import json

import pytest
import torch

pytest.importorskip("transformers")
from hf_runs import ARCHS, export, make_run  # noqa: E402
from parcae.cli import main  # noqa: E402
from parcae.runs import load_checkpoint  # noqa: E402


def _fail(argv, *needles):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    message = str(exit_.value.code)
    assert "\n" not in message and message.startswith(f"parcae {argv[0]}: error: "), message
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize("arch", list(ARCHS))
def test_export_then_import_is_exact(tmp_path, arch):
    run = make_run(tmp_path, arch, **ARCHS[arch])
    folder = export(run, tmp_path / "hf")
    main(["import", str(folder), "--runs_dir", str(tmp_path / "runs"), "--run_name", "back"])
    before = load_checkpoint(run / "last.ckpt")
    after = load_checkpoint(tmp_path / "runs" / "back" / "last.ckpt")
    assert after.config == before.config
    a, b = before.model.state_dict(), after.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "runs" / "back" / "import.json").read_text())
    assert record["format"] == "hf" and record["num_loops"] == (3 if before.config.looped else 1)
    # the tokenizer comes back with the same vocabulary (plus the <|bos|> post-processor of the HF folder)
    assert after.tokenizer.get_vocab() == before.tokenizer.get_vocab()


def test_import_refuses_an_hf_folder_with_foreign_weights(tmp_path):
    run = make_run(tmp_path, "parcae", **ARCHS["parcae"])
    folder = export(run, tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    state["lm_head.weight"] = state["model.wte.weight"].clone()
    save_file(state, folder / "model.safetensors")
    _fail(["import", str(folder), "--runs_dir", str(tmp_path / "runs")], "lm_head.weight", "not a parcae HF folder")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_export_refuses_a_loop_count_for_a_gpt_and_a_non_empty_target(tmp_path):
    run = make_run(tmp_path, "gpt", **ARCHS["gpt"])
    _fail(["export", "--format", "hf", "--num_loops", "4", str(run), str(tmp_path / "out")], "fixed-depth")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _fail(["export", "--format", "hf", str(run), str(tmp_path / "full")], "not empty")
    _fail(["export", "--num_loops", "4", str(run), str(tmp_path / "o2")], "--format hf")


@pytest.mark.parametrize("drop", [["block_size"], ["d_model", "n_kv_heads"]])
def test_import_refuses_a_config_json_that_lacks_model_fields(tmp_path, drop):
    """A missing field is not filled with ModelConfig's default (block_size 2048 for a 64-token model): one line
    names every missing field and nothing is written."""
    run = make_run(tmp_path, "parcae", **ARCHS["parcae"])
    folder = export(run, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    for name in drop:
        del config[name]
    (folder / "config.json").write_text(json.dumps(config))
    _fail(["import", str(folder), "--runs_dir", str(tmp_path / "runs")], ", ".join(drop), "refusing to fill in")
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_import_takes_defaults_only_for_the_label_and_training_only_fields(tmp_path):
    run = make_run(tmp_path, "parcae", **ARCHS["parcae"])
    folder = export(run, tmp_path / "hf")
    config = json.loads((folder / "config.json").read_text())
    for name in ("name", "depth_scheme", "depth_granularity", "init"):
        del config[name]
    (folder / "config.json").write_text(json.dumps(config))
    main(["import", str(folder), "--runs_dir", str(tmp_path / "runs"), "--run_name", "back"])
    before = load_checkpoint(run).config
    after = load_checkpoint(tmp_path / "runs" / "back").config
    assert after.block_size == before.block_size == 64 and after.d_model == before.d_model


def test_export_gives_every_file_the_same_mode(tmp_path):
    """safetensors writes model.safetensors 0600; the folder's other files are 0644 (umask 022)."""
    import os

    old = os.umask(0o022)
    try:
        folder = export(make_run(tmp_path, "parcae", **ARCHS["parcae"]), tmp_path / "hf")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in folder.iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


def test_export_removes_staging_folders_of_killed_exports_only(tmp_path):
    """A killed export leaves .<out>.partial-<pid>-<id>; the next export of that target removes it when its process
    is gone, and leaves a live process's staging folder, another target's and foreign names alone."""
    import os
    import subprocess
    import sys

    run = make_run(tmp_path, "parcae", **ARCHS["parcae"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = tmp_path / f".hf.partial-{dead_pid}-0123abcd"
    live = tmp_path / f".hf.partial-{os.getpid()}-89abcdef"
    other = tmp_path / f".other.partial-{dead_pid}-0123abcd"
    foreign = tmp_path / ".hf.partial-notapid"
    for folder in (stale, live, other, foreign):
        folder.mkdir()
        (folder / "model.safetensors").write_text("half")
    export(run, tmp_path / "hf")
    assert not stale.exists()
    assert live.exists() and other.exists() and foreign.exists()


def test_export_closing_line_says_what_trust_remote_code_runs(tmp_path, capsys):
    folder = export(make_run(tmp_path, "parcae", **ARCHS["parcae"]), tmp_path / "hf")
    line = capsys.readouterr().out.strip().splitlines()[-1]
    code = sorted(p.name for p in folder.glob("*.py"))
    assert code and f"trust_remote_code=True), which runs the folder's own Python files ({', '.join(code)})" in line


def test_every_model_config_field_survives_the_hf_config_round_trip(tmp_path):
    """ModelConfig -> ParcaeConfig -> config.json -> AutoConfig -> ModelConfig is the identity, field by field, with
    every field set away from its default; and each field is a ParcaeConfig parameter or a declared training-only
    field (a new ModelConfig field must not vanish into **kwargs)."""
    import dataclasses
    import inspect

    from transformers import AutoConfig

    import parcae.hf  # noqa: F401
    from parcae.hf import ParcaeConfig
    from parcae.interop.hf_folder import TRAINING_ONLY_FIELDS, hf_config, model_config_of
    from parcae.model import ModelConfig

    config = ModelConfig(name="every-field", vocab_size=300, padding_multiple=32, block_size=48, d_model=64, n_heads=4,
                         n_kv_heads=2, d_ff=96, n_prelude=1, n_recurrent=3, n_coda=1, block="sandwich", mlp="swiglu",
                         qk_norm=False, value_embeddings=False, rope_base=10000.0, norm_eps=1e-6,
                         injection="concat", readout=False, prelude_norm=False, state_init="zero",
                         mean_recurrence=5, backprop_depth=3, depth_scheme="fixed", depth_granularity="per_batch",
                         init="scaled")
    defaults = ModelConfig()
    same = [f.name for f in dataclasses.fields(ModelConfig) if getattr(config, f.name) == getattr(defaults, f.name)]
    assert not same, f"set these away from their defaults so the test can see them lost: {same}"
    params = inspect.signature(ParcaeConfig.__init__).parameters
    for field in dataclasses.fields(ModelConfig):
        assert field.name in params or field.name in TRAINING_ONLY_FIELDS, field.name
    hf_config(config).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    back = model_config_of(loaded.to_dict(), tmp_path / "config.json")
    assert back == config
    for field in dataclasses.fields(ModelConfig):
        assert getattr(loaded, field.name) == getattr(config, field.name), field.name


def test_export_refuses_a_model_config_field_the_hf_config_does_not_know(monkeypatch):
    import parcae.interop.hf_folder as hf_folder
    from parcae.interop import InteropError
    from parcae.model import ModelConfig

    monkeypatch.setattr(hf_folder, "TRAINING_ONLY_FIELDS", ("depth_scheme", "depth_granularity"))  # "init" unknown
    with pytest.raises(InteropError, match="ModelConfig field.s. init have no ParcaeConfig parameter"):
        hf_folder.hf_config(ModelConfig(d_model=64, n_heads=4, vocab_size=128))
