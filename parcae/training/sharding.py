"""Sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) through Lightning.

:class:`FullyShardedStrategy` is Lightning's ``ModelParallelStrategy`` used for data parallelism only: every
process is a data-parallel rank, parameters, gradients and optimizer state are sharded over the ranks
(``hybrid: true`` shards within a node and replicates across nodes, like FSDP1's HYBRID_SHARD). The
LightningModule's ``configure_model`` calls :func:`shard_model`, which makes each transformer block one
sharding unit (the prelude, recurrent and coda blocks; the embeddings, injection, readout and norms form the
root unit) and installs the depth agreement of per-sequence looping (:class:`MaxOverRanks`, see
``parcae/model/looped.py``). Checkpoints are distributed-checkpoint folders (one shard per rank);
``parcae consolidate RUN_DIR`` (``parcae/training/consolidate.py``) turns one into a single file.

    parcae fit --config recipes/table5_1.3b_parcae.yaml --trainer configs/trainer/fsdp_multinode.yaml
"""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn


class MaxOverRanks:
    """Local iteration counts -> their maxima over all ranks (one all-reduce of a few integers)."""

    def __init__(self, device: torch.device, group=None) -> None:
        self.device, self.group = torch.device(device), group

    def __call__(self, counts: list[int]) -> list[int]:
        if not dist.is_available() or not dist.is_initialized():
            return list(counts)
        values = torch.tensor(counts, dtype=torch.long, device=self.device)
        dist.all_reduce(values, op=dist.ReduceOp.MAX, group=self.group)
        return values.tolist()


class FullyShardedStrategy(ModelParallelStrategy):
    """FSDP2 data parallelism: all processes shard one model (or, ``hybrid``, shard per node, replicate across).

    Args:
        hybrid: Shard within each node and replicate across nodes (all-gathers stay inside a node).
        reshard_after_forward: Free the gathered parameters after each block's forward and gather again in
            backward (less memory); ``False`` keeps them until backward (less communication).
        save_distributed_checkpoint: Each rank writes its shard (a checkpoint folder; fast, any size).
            ``False`` gathers a single file on rank 0 (needs the full model in CPU memory).
        process_group_backend: ``nccl`` on GPUs, ``gloo`` on CPUs by default.
        timeout: Collective timeout.
    """

    def __init__(self, hybrid: bool = False, reshard_after_forward: bool = True,
                 save_distributed_checkpoint: bool = True, process_group_backend: Optional[str] = None,
                 timeout: Optional[timedelta] = timedelta(minutes=30)) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size="auto",
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, timeout=timeout)
        self.hybrid, self.reshard_after_forward = hybrid, reshard_after_forward

    def setup_environment(self) -> None:
        # Every process is a data-parallel rank (the base class would treat the devices of a node as tensor
        # parallel): the sampler then gives each process its own rows.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        """Write the checkpoint folder under a staging name, then rename it into place (rank 0), so a process
        killed during a save leaves the previous checkpoint of that name intact (as ``AtomicCheckpointIO``
        does for single files). The only unsafe moment is between two renames of an existing folder."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        staging, previous = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
        if self.global_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)
        self.barrier()
        super().save_checkpoint(checkpoint, staging, storage_options)
        self.barrier()
        if self.global_rank == 0:
            shutil.rmtree(previous, ignore_errors=True)
            if path.exists():
                path.rename(previous)
            staging.rename(path)
            shutil.rmtree(previous, ignore_errors=True)
        self.barrier()

    def shard_mesh(self):
        """The mesh ``fully_shard`` uses: 1-D over all ranks, or (nodes, devices per node) when hybrid."""
        if not self.hybrid:
            return self.device_mesh["data_parallel"]
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(self.root_device.type, (self.num_nodes, self.num_processes),
                                mesh_dim_names=("replicate", "shard"))


def shard_model(net: nn.Module, strategy: ModelParallelStrategy) -> None:
    """Apply ``fully_shard`` to each block, then to the whole model, and make the loop agree on depths."""
    from torch.distributed.fsdp import fully_shard

    if isinstance(strategy, FullyShardedStrategy):
        mesh, reshard = strategy.shard_mesh(), strategy.reshard_after_forward
    else:  # a plain ModelParallelStrategy: usable when it does no tensor parallelism
        if strategy.device_mesh["tensor_parallel"].size() != 1:
            raise ValueError("parcae shards only for data parallelism: use "
                             "parcae.training.sharding.FullyShardedStrategy (no tensor parallelism)")
        mesh, reshard = strategy.device_mesh["data_parallel"], True
    for blocks in (net.prelude, net.recurrent, net.coda):
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=reshard)
    fully_shard(net, mesh=mesh, reshard_after_forward=reshard)
    if getattr(net, "injection", None) is not None:  # looped: every rank runs the same number of iterations
        net.depth_sync = MaxOverRanks(strategy.root_device)
