"""Trainer presets and launch scripts parse; global batch and token budget turn into accumulation and steps."""

import subprocess

import pytest

from parcae.cli import ParcaeCLI, main


@pytest.mark.parametrize("script", ["scripts/launch_slurm.sbatch", "scripts/launch_torchrun.sh",
                                    "scripts/setup_env.sh", "scripts/test.sh", "scripts/demo.sh"])
def test_shell_scripts_have_valid_syntax(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0


@pytest.mark.parametrize("preset", ["cpu", "gpu", "ddp_multinode", "fsdp_multinode"])
def test_trainer_presets_parse_over_a_recipe(preset, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", "recipes/mini/debug.yaml", "--trainer", f"configs/trainer/{preset}.yaml",
              "--print_config"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    if preset.endswith("multinode"):
        assert "num_nodes: 2" in out and "precision: bf16-mixed" in out
        assert ("DDPStrategy" in out) == (preset == "ddp_multinode")
        assert ("FullyShardedStrategy" in out) == (preset == "fsdp_multinode")  # run by tests/training/test_fsdp.py


def test_global_batch_and_tokens_become_accumulation_and_steps(small_shards, tmp_path):
    from conftest import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", small_shards, tmp_path / "runs", max_steps=-1,
                          extra="global_batch_size: 16\nmax_tokens: 51200\n")
    cli = ParcaeCLI(args=["--config", str(recipe)], run=False)
    # batch 4 per device, 1 device: accumulate 4; 16 x 32 tokens per step -> 51200 / 512 = 100 steps
    assert cli.trainer.accumulate_grad_batches == 4 and cli.trainer.max_steps == 100
    bad = write_recipe(tmp_path / "b.yaml", small_shards, tmp_path / "runs2", extra="global_batch_size: 10\n")
    with pytest.raises(SystemExit, match="not a multiple of data.batch_size"):
        main(["fit", "--config", str(bad)])
