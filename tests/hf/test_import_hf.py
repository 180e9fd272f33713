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
