"""Sharded (FSDP2) training on 2 CPU processes against 1 plain process on the same global batch.

    python tests/training/fsdp_equivalence.py reference --out /tmp/fsdp      # 1 process, batch 8
    python -m torch.distributed.run --nproc_per_node 2 tests/training/fsdp_equivalence.py sharded --out /tmp/fsdp

``reference`` writes reference.json: the training loss of 5 steps with AdamW and with MuonAdamW (per-sequence
depths, truncated backprop). ``sharded`` runs, on every rank:

1. ``no_hang``: rank 0's rows loop once, rank 1's six times, one forward/backward of the sharded model; the
   gathered gradients must equal the unsharded model's on the whole batch (each rank checks; a hang is caught
   by the gloo timeout and the test's subprocess timeout).
2. ``muon``: one MuonAdamW step on sharded parameters equals the same step on an unsharded copy.
3. the 5-step training of ``reference`` through Lightning with the strategy of
   configs/trainer/fsdp_multinode.yaml (overridden for CPU: gloo, fp32, 2 devices, 1 node) and per-iteration
   activation checkpointing on; rank 0 writes sharded.json.
"""

import argparse
import copy
import importlib
import json
import sys
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import yaml
from torch.distributed.tensor import DTensor, distribute_tensor

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from conftest import TINY_ARCH  # noqa: E402
from ddp_equivalence import FixedBlocks, Recorder  # noqa: E402

from parcae.model import Depths, LoopedLM, ModelConfig  # noqa: E402
from parcae.training import LoopedLMModule  # noqa: E402
from parcae.training.optim import OptimizerConfig, build_optimizer  # noqa: E402

PRESET = HERE.parent.parent / "configs" / "trainer" / "fsdp_multinode.yaml"
OPTIMIZERS = {"adamw": {"name": "adamw", "lr": 0.003},
              "muon_adamw": {"name": "muon_adamw", "lr": 0.003, "muon_lr": 0.01}}
STEPS, GLOBAL_BATCH = 5, 8


def preset_trainer_kwargs(devices: int) -> dict:
    """The FSDP preset as Trainer arguments, with the CPU overrides the tests need."""
    preset = yaml.safe_load(PRESET.read_text())
    spec = preset["strategy"]
    module, name = spec["class_path"].rsplit(".", 1)
    strategy = getattr(importlib.import_module(module), name)(
        **{**spec.get("init_args", {}), "process_group_backend": "gloo", "timeout": timedelta(seconds=90)})
    return {"strategy": strategy, "accelerator": "cpu", "devices": devices, "num_nodes": 1, "precision": "32-true",
            "gradient_clip_val": preset["gradient_clip_val"]}


def train(optimizer: str, sharded: bool) -> list[float]:
    L.seed_everything(1234)
    module = LoopedLMModule(arch=TINY_ARCH, optimizer=OPTIMIZERS[optimizer], schedule={"name": "constant"},
                            activation_checkpointing=sharded)
    recorder = Recorder()
    kwargs = preset_trainer_kwargs(dist.get_world_size()) if sharded else {
        "accelerator": "cpu", "devices": 1, "gradient_clip_val": 1.0}
    trainer = L.Trainer(max_steps=STEPS, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[recorder], use_distributed_sampler=False, **kwargs)
    per_rank = GLOBAL_BATCH // (dist.get_world_size() if sharded else 1)
    trainer.fit(module, datamodule=FixedBlocks(batch_size=per_rank))
    if sharded:  # really sharded: every parameter is a DTensor holding this rank's part
        assert all(isinstance(p, DTensor) for p in module.net.parameters())
        assert module.net.wte.weight.to_local().shape[0] == module.net.wte.weight.shape[0] // 2
    return recorder.losses


def _sharded_copy(net: LoopedLM) -> LoopedLM:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from parcae.training.sharding import MaxOverRanks

    sharded = copy.deepcopy(net)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in [*sharded.prelude, *sharded.recurrent, *sharded.coda]:
        fully_shard(block, mesh=mesh)
    fully_shard(sharded, mesh=mesh)
    sharded.depth_sync = MaxOverRanks(torch.device("cpu"))
    return sharded


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def check_no_hang() -> dict:
    """Ranks draw very different depths; the sharded gradients equal the unsharded global-batch gradients."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    arch = ModelConfig(**TINY_ARCH)
    net = LoopedLM(arch)
    ids = torch.randint(0, arch.vocab_size, (2 * world, 16), generator=torch.Generator().manual_seed(1))
    totals = torch.tensor([1 if r == 0 else 6 for _ in range(2) for r in range(world)])  # row i -> rank i % world
    depths = Depths.split(totals, arch.backprop_depth)
    seeds = list(range(len(totals)))
    sharded = _sharded_copy(net)
    net(ids, ids, depths=depths, state_seed=seeds).loss.backward()       # the whole batch, unsharded
    rows = slice(rank, None, world)
    mine = Depths(depths.no_grad[rows], depths.grad[rows])
    sharded(ids[rows], ids[rows], depths=mine, state_seed=seeds[rows]).loss.backward()
    worst = max((_full(p.grad) - q.grad).abs().max().item()
                for p, q in zip(sharded.parameters(), net.parameters()))
    return {"max_grad_difference": worst}


def check_muon_update() -> dict:
    """One MuonAdamW step on sharded parameters equals the step on unsharded ones."""
    torch.manual_seed(0)
    net = LoopedLM(ModelConfig(**{**TINY_ARCH, "d_ff": 48}))  # 48 x 32 and 32 x 48 matrices, split over ranks
    sharded = _sharded_copy(net)
    initial = [p.detach().clone() for p in net.parameters()]
    config = OptimizerConfig(name="muon_adamw", lr=0.003, muon_lr=0.02, muon_weight_decay=0.1)
    plain_opt, sharded_opt = build_optimizer(net, config), build_optimizer(sharded, config)
    for step in range(2):  # the second step also uses the momentum buffers
        grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * step + i))
                 for i, p in enumerate(net.parameters())]
        for p, q, g in zip(net.parameters(), sharded.parameters(), grads):
            p.grad = g.clone()
            q.grad = distribute_tensor(g.clone(), q.device_mesh, q.placements, src_data_rank=None)
        plain_opt.step()
        sharded_opt.step()
    matrices = sum(p.dim() == 2 for p in net.recurrent.parameters())
    worst = max((_full(q) - p).abs().max().item() for p, q in zip(net.parameters(), sharded.parameters()))
    moved = min((p - p0).abs().max().item() for p, p0 in zip(net.parameters(), initial))
    return {"max_param_difference": worst, "recurrent_matrices": int(matrices), "moved": moved}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["reference", "sharded"])
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mode == "reference":
        result = {name: train(name, sharded=False) for name in OPTIMIZERS}
    else:
        dist.init_process_group("gloo", timeout=timedelta(seconds=90))
        result = {"no_hang": check_no_hang(), "muon": check_muon_update()}
        result.update({name: train(name, sharded=True) for name in OPTIMIZERS})
    if not dist.is_initialized() or dist.get_rank() == 0:
        (out / f"{args.mode}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
