"""Real interruptions: SIGKILL mid-training then `--ckpt_path last` reproduces the uninterrupted run step by step;
a kill during a checkpoint write leaves the previous checkpoint loadable; NaN losses stop training cleanly."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import write_recipe

HERE = Path(__file__).parent


def _parcae(*args, **kwargs):
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "parcae", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def _fit_here(capsys, *args) -> tuple[int, str]:
    """``parcae fit`` in this process (the resume after a kill: what it tests is the files the killed process left,
    not a process of its own): (exit status, what it printed)."""
    from parcae.cli import main

    capsys.readouterr()
    code = 0
    try:
        main(["fit", *map(str, args)])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _scalars(path, tag):
    ea = EventAccumulator(str(path), size_guidance={"scalars": 0})
    ea.Reload()
    return {e.step: e.value for e in ea.Scalars(tag)}


@pytest.mark.slow
@pytest.mark.subprocess  # a real process killed (the resume after it runs in-process)
def test_sigkill_then_resume_matches_the_uninterrupted_run(tmp_path, small_shards, capsys):
    steps = 40
    ref = write_recipe(tmp_path / "ref.yaml", small_shards, tmp_path / "runs", "ref", max_steps=steps)
    run = write_recipe(tmp_path / "run.yaml", small_shards, tmp_path / "runs", "run", max_steps=steps)
    for recipe in (ref, run):  # one loader worker: the data position lives in the worker too
        recipe.write_text(recipe.read_text().replace("num_workers: 0", "num_workers: 1")
                          .replace("checkpoint_every: 4", "checkpoint_every: 10"))
    # The uninterrupted reference runs beside the victim (it shares nothing with it): half the wall time.
    reference = _parcae("fit", "--config", str(ref))
    victim = _parcae("fit", "--config", str(run))
    run_dir = tmp_path / "runs" / "run"
    deadline = time.time() + 240
    while not (run_dir / "step=0000020.ckpt").exists() and time.time() < deadline:
        time.sleep(0.01)
    assert victim.poll() is None, "the run finished before it could be killed:\n" + victim.stdout.read()
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait()
    from parcae.runs import newest_checkpoint

    start = newest_checkpoint(run_dir).step  # the newest good state by step (last.ckpt may lag step=N.ckpt)
    assert 10 <= start < steps
    assert reference.wait(timeout=300) == 0, reference.stdout.read()

    before = set(run_dir.glob("events.out.tfevents.*"))
    code, output = _fit_here(capsys, "--config", run, "--ckpt_path", "last")
    assert code == 0, output
    new_events = set(run_dir.glob("events.out.tfevents.*")) - before
    assert len(new_events) == 1
    ref_loss = _scalars(tmp_path / "runs" / "ref", "train/loss")
    got = _scalars(new_events.pop(), "train/loss")
    assert sorted(got) == list(range(start, steps))          # continues from the last checkpoint on disk
    for step in range(start, steps):                         # ... and sees exactly what the reference saw
        assert got[step] == pytest.approx(ref_loss[step], abs=1e-6), f"step {step}"
    ref_val, got_val = _scalars(tmp_path / "runs" / "ref", "val/loss"), _scalars(run_dir, "val/loss")
    later = [s for s in ref_val if s >= start]
    assert later and all(got_val[s] == pytest.approx(ref_val[s], abs=1e-6) for s in later)
    final_ref = torch.load(tmp_path / "runs" / "ref" / "last.ckpt", weights_only=False, map_location="cpu")
    final_run = torch.load(run_dir / "last.ckpt", weights_only=False, map_location="cpu")
    for key, value in final_ref["state_dict"].items():
        torch.testing.assert_close(final_run["state_dict"][key], value, atol=1e-6, rtol=0)


@pytest.mark.slow
@pytest.mark.subprocess  # a real process killed (the resume after it runs in-process)
def test_kill_during_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, small_shards, capsys):
    extra = ("  callbacks:\n  - class_path: crash_helpers.KillDuringSave\n    init_args:\n      at_step: 5\n")
    recipe = write_recipe(tmp_path / "r.yaml", small_shards, tmp_path / "runs", "crash", max_steps=12)
    text = recipe.read_text().replace("trainer:\n", "trainer:\n" + extra, 1)
    recipe.write_text(text)
    proc = _parcae("fit", "--config", str(recipe))
    assert proc.wait(timeout=300) == -signal.SIGKILL
    run_dir = tmp_path / "runs" / "crash"
    assert not (run_dir / "step=0000008.ckpt").exists()       # the interrupted write never appears
    assert list(run_dir.glob(".step=0000008.ckpt.tmp-*"))     # ... only its staging file does
    last = torch.load(run_dir / "last.ckpt", weights_only=False, map_location="cpu")
    assert last["global_step"] == 4                           # the previous checkpoint, intact
    code, output = _fit_here(capsys, "--config", write_recipe(tmp_path / "plain.yaml", small_shards, tmp_path / "runs",
                                                              "crash", max_steps=12), "--ckpt_path", "last")
    assert code == 0, output
    assert torch.load(run_dir / "last.ckpt", weights_only=False, map_location="cpu")["global_step"] == 12
    assert not list(run_dir.glob(".*.tmp-*"))                  # stale staging files are cleaned up


@pytest.mark.slow
@pytest.mark.subprocess  # a real process killed (the resume after it runs in-process)
def test_kill_during_the_write_of_last_ckpt_resumes_from_the_newer_step_checkpoint(tmp_path, small_shards,
                                                                                     capsys):
    """Issue 19 #7: step=0000010.ckpt is saved, then a kill -9 hits last.ckpt's staging file, so last.ckpt still
    holds step 5. A resume takes the newest good state by step (step 10) and goes forward, never back."""
    extra = ("  callbacks:\n  - class_path: crash_helpers.KillDuringLastSave\n    init_args:\n      at_step: 10\n")
    recipe = write_recipe(tmp_path / "r.yaml", small_shards, tmp_path / "runs", "crash", max_steps=12)
    recipe.write_text(recipe.read_text().replace("checkpoint_every: 4", "checkpoint_every: 5")
                      .replace("trainer:\n", "trainer:\n" + extra, 1))
    proc = _parcae("fit", "--config", str(recipe))
    assert proc.wait(timeout=300) == -signal.SIGKILL, proc.stdout.read()
    run_dir = tmp_path / "runs" / "crash"
    assert torch.load(run_dir / "last.ckpt", weights_only=False, map_location="cpu")["global_step"] == 5
    assert list(run_dir.glob(".last.ckpt.tmp-*"))              # the interrupted write
    step10 = (run_dir / "step=0000010.ckpt").read_bytes()
    plain = write_recipe(tmp_path / "plain.yaml", small_shards, tmp_path / "runs", "crash", max_steps=12)
    plain.write_text(plain.read_text().replace("checkpoint_every: 4", "checkpoint_every: 5"))
    before = set(run_dir.glob("events.out.tfevents.*"))
    code, output = _fit_here(capsys, "--config", plain, "--ckpt_path", "last")
    assert code == 0, output
    assert "resuming from" in output and "step=0000010.ckpt" in output and "last.ckpt holds step 5" in output
    (new_events,) = set(run_dir.glob("events.out.tfevents.*")) - before
    assert sorted(_scalars(new_events, "train/loss")) == [10, 11]  # steps 6-10 are not trained again
    assert (run_dir / "step=0000010.ckpt").read_bytes() == step10
    assert torch.load(run_dir / "last.ckpt", weights_only=False, map_location="cpu")["global_step"] == 12
    assert not [p.name for p in run_dir.iterdir() if "-v" in p.name]
    assert not list(run_dir.glob(".*.tmp-*"))


def test_nonfinite_losses_skip_steps_then_stop_with_a_clear_message(tmp_path, small_shards):
    import lightning as L

    from crash_helpers import PoisonWeights
    from parcae.data import TokenDataModule
    from parcae.training import LoopedLMModule, NonFiniteLossError
    from conftest import TINY_ARCH

    module = LoopedLMModule(arch=TINY_ARCH, optimizer={"name": "adamw", "lr": 0.003}, schedule={"name": "constant"},
                            max_nonfinite_losses=3)
    dm = TokenDataModule(datasets=[str(small_shards)], seq_len=32, batch_size=4, num_workers=0)
    snapshots = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[trainer.global_step] = pl_module.net.recurrent[0].attn.q_proj.weight.detach().clone()

    trainer = L.Trainer(accelerator="cpu", max_steps=20, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[PoisonWeights(at_step=4), Snapshot()], gradient_clip_val=1.0)
    with pytest.raises(NonFiniteLossError, match=r"stopped at step 6: the loss was nan for 3 consecutive steps"):
        trainer.fit(module, datamodule=dm)
    assert not torch.equal(snapshots[3], snapshots[4])   # it trained before the poison
    assert torch.equal(snapshots[4], snapshots[6])       # NaN-gradient steps were skipped
    assert module.skipped_steps == 2 and trainer.global_step == 6
