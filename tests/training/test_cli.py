"""The parcae command end to end on CPU: fit -> TensorBoard tags, test --loops -> table/JSON/CSV/PNG, predict,
run-directory rules and one-line errors for bad input."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import copy_run, write_recipe
from parcae.cli import main


@pytest.fixture
def trained_run(tiny_run):
    return tiny_run  # the session's shared 12-step run (conftest.tiny_run)


def test_fit_writes_checkpoints_config_and_every_dashboard_tag(trained_run):
    _, _, run_dir = trained_run
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "last.ckpt", "step=0000004.ckpt", "step=0000008.ckpt", "step=0000012.ckpt"} <= names
    # the fit's own events file: the run is shared, and evaluations of it (validate, test) add files beside it
    fit_events = min(run_dir.glob("events.out.tfevents.*"), key=lambda p: (int(p.name.split(".")[3]), p.name))
    ea = EventAccumulator(str(fit_events), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    ea.Reload()
    scalars = set(ea.Tags()["scalars"])
    required = {"train/loss", "train/ppl", "val/loss", "val/loss_T1", "val/loss_T2", "val/loss_T3", "val/bpb",
                "val/ppl", "lr", "grad_norm", "perf/tokens_per_sec", "perf/mfu", "loop/spectral_radius",
                "loop/mean_decay", "loop/state_norm", "loop/state_norm_t00", "loop/state_norm_t01",
                "loop/residual", "loop/rel_residual", "tokens_seen", "hp/val_loss", "train/skipped_steps"}
    assert required <= scalars, required - scalars
    assert "loop/depth" in ea.Tags()["histograms"]
    train = ea.Scalars("train/loss")
    assert [e.step for e in train] == list(range(12))
    assert train[-1].value < train[0].value                      # it learns
    assert [e.step for e in ea.Scalars("val/loss")] == [5, 11]  # no placeholder point at step 0
    assert ea.Scalars("tokens_seen")[-1].value == 12 * 4 * 32
    assert ea.Scalars("loop/spectral_radius")[0].value == pytest.approx(0.4472, abs=1e-3)
    assert ea.PluginTagToContent("custom_scalars")  # the loss-by-loops layout
    assert 0 < ea.Scalars("perf/mfu")[-1].value < 1


def test_test_sweep_prints_and_saves_the_table(trained_run, capsys):
    _, _, run_dir = trained_run
    main(["test", "--ckpt_path", str(run_dir / "last.ckpt"), "--loops", "1-3,6"])
    out = capsys.readouterr().out
    assert "loss by loop count" in out and "tokens/s" in out
    flat = " ".join(out.split())  # rich wraps the table title on narrow terminals
    assert "on the val split" in flat and "step 12" in flat  # no test split in these shards: it says so
    results = json.loads((run_dir / "test_loops.json").read_text())
    assert results["global_step"] == 12 and results["split"] == "val"  # the checkpoint's real step
    assert [r["loops"] for r in results["results"]] == [1, 2, 3, 6]
    assert all(r["bpb"] > 0 and r["tokens_per_sec"] > 0 for r in results["results"])
    assert (run_dir / "test_loops.csv").read_text().splitlines()[0] == "loops,loss,ppl,bpb,tokens_per_sec"
    assert (run_dir / "test_loops.png").stat().st_size > 1000
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    assert {"test_on_val/loss_T1", "test_on_val/loss_T6"} <= set(ea.Tags()["scalars"])


@pytest.mark.parametrize("loops, message", [("2,x", "'x' is not an integer"), ("0,4", "must be >= 1"),
                                            ("5-2", "range '5-2' is empty")])
def test_bad_loop_counts_are_one_line_errors(trained_run, capsys, loops, message):
    _, _, run_dir = trained_run
    with pytest.raises(SystemExit) as info:
        main(["test", "--ckpt_path", str(run_dir / "last.ckpt"), "--loops", loops])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_gpt_checkpoint_rejects_loop_counts(tmp_path, small_shards):
    recipe = write_recipe(tmp_path / "gpt.yaml", small_shards, tmp_path / "runs", run_name="gpt", max_steps=2,
                          arch={"name": "tiny-gpt", "injection": "none"})
    main(["fit", "--config", str(recipe)])
    with pytest.raises(SystemExit, match="fixed-depth model"):
        main(["test", "--ckpt_path", str(tmp_path / "runs" / "gpt" / "last.ckpt"), "--loops", "4"])


def test_predict_generates_from_a_prompt(trained_run, capsys):
    _, _, run_dir = trained_run
    main(["predict", "--ckpt_path", str(run_dir / "last.ckpt"), "--prompt", "alpha beta", "--loops", "2",
          "--max_new_tokens", "5", "--temperature", "0"])
    assert "alpha beta" in capsys.readouterr().out


def test_predict_decodes_as_generate_does(trained_run, capsys):
    """predict_step decodes with the engine: the same greedy text as `parcae generate` at the same loops, and
    --max_new_tokens 0 (accepted by both) gives back the prompt alone."""
    _, _, run_dir = trained_run
    settings = ["--ckpt_path", str(run_dir / "last.ckpt"), "--prompt", "alpha beta", "--loops", "2",
                "--temperature", "0"]
    texts = {}
    for verb in ("predict", "generate"):
        main([verb, *settings, "--max_new_tokens", "6"])
        texts[verb] = capsys.readouterr().out.strip().splitlines()[-1]
    assert texts["predict"] == texts["generate"] and texts["predict"].startswith("alpha beta")
    for verb in ("predict", "generate"):
        main([verb, *settings, "--max_new_tokens", "0"])
        assert capsys.readouterr().out.strip().splitlines()[-1] == "alpha beta"


def test_existing_run_dir_is_never_silently_reused(trained_run, tmp_path, small_shards):
    recipe, run_dir = copy_run(trained_run[2], tmp_path, small_shards)  # it resumes the run: a private copy
    with pytest.raises(SystemExit, match="already holds checkpoints"):
        main(["fit", "--config", str(recipe)])
    # asked-for auto-resume continues the run (here: to step 16)
    main(["fit", "--config", str(recipe), "--auto_resume", "true", "--trainer.max_steps", "16"])
    ea = EventAccumulator(str(run_dir))
    ea.Reload()
    assert max(e.step for e in ea.Scalars("train/loss")) == 15


def test_missing_data_fails_fast_with_the_folder_and_the_command(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "no_such_data", tmp_path / "runs")
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(recipe)])
    assert "no_such_data does not exist" in str(info.value) and "python -m data_prep" in str(info.value)
    assert not (tmp_path / "runs").exists()


def test_vocabulary_mismatch_is_refused(tmp_path, small_shards):
    recipe = write_recipe(tmp_path / "r.yaml", small_shards, tmp_path / "runs", arch={"vocab_size": 8192})
    with pytest.raises(SystemExit, match="4,096-token vocabulary .* vocab_size 8,192"):
        main(["fit", "--config", str(recipe)])


def test_print_config_resolves_composed_pieces(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "recipes/mini/debug.yaml", "--print_config"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "d_model: 64" in out and "name: trapezoid" in out and "precision: 32-true" in out


def test_validate_reports_every_loop_count_from_one_memory_mapped_load(trained_run, capsys, monkeypatch):
    """validate checks the checkpoint, reads its hyperparameters and restores the model from one memory-mapped
    torch.load (it was three: the run-config check, LightningCLI's hyperparameters, Lightning's restore)."""
    import torch

    _, _, run_dir = trained_run
    loads, real_load = [], torch.load

    def counting_load(f, *args, **kwargs):
        loads.append((str(f), kwargs.get("mmap")))
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    main(["validate", "--ckpt_path", str(run_dir / "step=0000008.ckpt")])
    out = capsys.readouterr().out
    assert "val/loss_T3" in out and "val/bpb" in out
    assert loads == [(str(run_dir / "step=0000008.ckpt"), True)]


def test_every_extra_verb_is_listed_and_dispatches(capsys):
    import importlib

    from parcae.cli import VERBS

    for verb, (target, help_text) in VERBS.items():  # every entry names a function that exists
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), verb
        assert help_text
    main(["model", "parcae-debug", "--meta"])
    assert "942,976 parameters" in capsys.readouterr().out
    main(["report", "--list"])
    assert "table5" in capsys.readouterr().out


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path, small_shards, monkeypatch):
    """model.compile compiles each block (the loop stays eager); the losses match eager training."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    losses = {}
    for compile_blocks in ("false", "true"):
        recipe = write_recipe(tmp_path / f"c_{compile_blocks}.yaml", small_shards, tmp_path / "runs",
                              run_name=f"compile_{compile_blocks}", max_steps=4)
        main(["fit", "--config", str(recipe), "--model.compile", compile_blocks])
        ea = EventAccumulator(str(tmp_path / "runs" / f"compile_{compile_blocks}"), size_guidance={"scalars": 0})
        ea.Reload()
        losses[compile_blocks] = [e.value for e in ea.Scalars("train/loss")]
    assert len(losses["true"]) == 4
    assert losses["true"] == pytest.approx(losses["false"], abs=1e-4)
