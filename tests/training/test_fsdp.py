"""Sharded training (FSDP2 through configs/trainer/fsdp_multinode.yaml) on 2 gloo CPU processes equals 1 plain
process on the same global batch; ranks with different loop depths do not hang; MuonAdamW orthogonalises whole
matrices; sharded checkpoints resume exactly after SIGKILL and consolidate into one loadable file; bf16-mixed
runs from the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port

HERE = Path(__file__).parent
SCRIPT = HERE / "fsdp_equivalence.py"


def test_extra_zero_row_iterations_change_nothing(tiny_config):
    """What a rank does when another rank loops longer: calls on zero rows leave loss and gradients unchanged."""
    from parcae.model import Depths, LoopedLM

    torch.manual_seed(0)
    net = LoopedLM(tiny_config())
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(0))
    depths = Depths(no_grad=[0, 2, 1], grad=[1, 2, 2])
    loss = net(ids, ids, depths=depths, state_seed=[1, 2, 3]).loss
    loss.backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    seen = []
    net.depth_sync = lambda counts: seen.append(list(counts)) or [c + 3 for c in counts]
    synced = net(ids, ids, depths=depths, state_seed=[1, 2, 3], telemetry=True).loss
    synced.backward()
    assert seen == [[2, 2]]                                   # one agreement per forward: (no-grad, grad) maxima
    assert synced.item() == loss.item()
    for p, g in zip(net.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_sharded_processes_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [[sys.executable, str(SCRIPT), "reference", "--out", str(tmp_path)],
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
             str(SCRIPT), "sharded", "--out", str(tmp_path)]]
    for command in runs:  # the timeout catches a hang (ranks whose loop counts disagree would wait for ever)
        result = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=HERE, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    one = json.loads((tmp_path / "reference.json").read_text())
    two = json.loads((tmp_path / "sharded.json").read_text())
    assert two["no_hang"]["max_grad_difference"] < 1e-6       # rank 0 looped once, rank 1 six times
    assert two["muon"]["max_param_difference"] < 1e-6 and two["muon"]["moved"] > 1e-4
    for optimizer in ("adamw", "muon_adamw"):
        assert len(one[optimizer]) == len(two[optimizer]) == 5
        assert two[optimizer] == pytest.approx(one[optimizer], abs=1e-5), optimizer
    assert one["adamw"] != one["muon_adamw"]                  # the two optimizers really differ


REPO = HERE.parent.parent
FSDP_PRESET = ["--trainer", str(REPO / "configs" / "trainer" / "fsdp_multinode.yaml"),  # + CPU overrides
               "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.num_nodes", "1",
               "--trainer.precision", "32-true", "--trainer.strategy.init_args.process_group_backend", "gloo",
               "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "2"]


def _torchrun(port: int, *args):
    """`parcae` under torchrun with 2 CPU processes (the documented launch), in its own process group."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(port), "-m", "parcae", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_sigkill_resume_matches_and_consolidates(tmp_path, small_shards):
    """Both ranks are SIGKILLed before step 11 (checkpoints at 4 and 8); `--ckpt_path last` resumes from the
    sharded last.ckpt/ folder and repeats steps 8-10 exactly as the killed run logged them, then finishes; the
    final folder consolidates into one file that `parcae test` loads."""
    from test_resume import _scalars

    from conftest import write_recipe
    from parcae.cli import main

    steps, kill_at = 16, 11
    run_dir = tmp_path / "runs" / "run"
    recipe = write_recipe(tmp_path / "run.yaml", small_shards, tmp_path / "runs", "run", max_steps=steps)
    recipe.write_text(recipe.read_text().replace("val_every: 6", f"val_every: {steps}")
                      .replace("name: adamw", "name: muon_adamw"))
    killing = tmp_path / "kill.yaml"
    killing.write_text(recipe.read_text().replace("trainer:\n", "trainer:\n  callbacks:\n  - class_path: "
                                                  f"crash_helpers.KillAtStep\n    init_args:\n      at_step: {kill_at}\n", 1))
    victim = _torchrun(free_port(), "fit", "--config", str(killing), *FSDP_PRESET)
    assert victim.wait(timeout=240) != 0, victim.stdout.read()[-4000:]
    meta = torch.load(run_dir / "last.ckpt" / "meta.pt", weights_only=False)
    assert meta["global_step"] == 8 and not list(run_dir.glob(".*.tmp"))
    before = set(run_dir.glob("events.out.tfevents.*"))
    killed_log = _scalars(before.copy().pop(), "train/loss")
    assert sorted(killed_log) == list(range(kill_at))

    resumed = _torchrun(free_port(), "fit", "--config", str(recipe), *FSDP_PRESET, "--ckpt_path", "last")
    assert resumed.wait(timeout=240) == 0, resumed.stdout.read()[-4000:]
    new_events = set(run_dir.glob("events.out.tfevents.*")) - before
    assert len(new_events) == 1
    got = _scalars(new_events.pop(), "train/loss")
    assert sorted(got) == list(range(8, steps))              # continues from the last checkpoint on disk
    for step in range(8, kill_at):                            # ... exactly as the uninterrupted steps went
        assert got[step] == pytest.approx(killed_log[step], abs=1e-6), f"step {step}"

    # The sharded last.ckpt/ -> one file with full tensors, which `parcae test` (one process) loads.
    with pytest.raises(SystemExit, match="sharded checkpoint folder: run `parcae consolidate"):
        main(["test", "--ckpt_path", str(run_dir / "last.ckpt"), "--loops", "1,2"])
    main(["consolidate", str(run_dir)])
    single = torch.load(run_dir / "last-consolidated.ckpt", weights_only=False)
    assert single["global_step"] == steps and "optimizer_0" not in single
    assert single["state_dict"]["net.wte.weight"].shape == (4096, 32)      # whole, not a rank's half
    main(["test", "--ckpt_path", str(run_dir / "last-consolidated.ckpt"), "--loops", "1,2"])
    results = json.loads((run_dir / "test_loops.json").read_text())
    assert [r["loops"] for r in results["results"]] == [1, 2]
    assert all(0 < r["loss"] < 8.3 for r in results["results"])  # trained: below ln(4096) = 8.32 of a uniform guess


def test_bf16_mixed_cli_run_trains_close_to_fp32(tmp_path, small_shards):
    """`precision: bf16-mixed` from the CLI (CPU autocast): 3 finite steps that round differently from fp32."""
    from test_resume import _scalars

    from conftest import write_recipe
    from parcae.cli import main

    losses = {}
    for precision in ("32-true", "bf16-mixed"):
        name = precision.replace("-", "_")
        recipe = write_recipe(tmp_path / f"{name}.yaml", small_shards, tmp_path / "runs", name, max_steps=3)
        main(["fit", "--config", str(recipe), "--trainer.precision", precision])
        losses[precision] = _scalars(tmp_path / "runs" / name, "train/loss")
        saved = (tmp_path / "runs" / name / "config.yaml").read_text()
        assert f"precision: {precision}" in saved
    assert sorted(losses["bf16-mixed"]) == [0, 1, 2]
    for step in range(3):
        bf16, fp32 = losses["bf16-mixed"][step], losses["32-true"][step]
        assert bf16 == pytest.approx(fp32, abs=0.05) and bf16 != fp32, (step, bf16, fp32)


def test_consolidate_refuses_what_it_cannot_consolidate(tmp_path):
    from parcae.cli import main

    with pytest.raises(SystemExit, match="no such run directory"):
        main(["consolidate", str(tmp_path / "missing")])
    (tmp_path / "run").mkdir()
    torch.save({"state_dict": {}}, tmp_path / "run" / "last.ckpt")  # a single-file checkpoint
    with pytest.raises(SystemExit, match="has no sharded checkpoint that loads"):
        main(["consolidate", str(tmp_path / "run")])
