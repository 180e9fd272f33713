#!/usr/bin/env bash
# Multi-node training with torchrun (no SLURM). Run the same command on every node:
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 scripts/launch_torchrun.sh recipes/table5_140m_parcae.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 scripts/launch_torchrun.sh recipes/table5_140m_parcae.yaml
# GPUS_PER_NODE defaults to all visible GPUs; Lightning reads torchrun's environment (TorchElasticEnvironment).
# TRAINER_PRESET=configs/trainer/fsdp_multinode.yaml trains sharded (FSDP2) instead of DDP (docs/multinode.md).
set -euo pipefail
RECIPE=${1:?usage: NNODES=.. NODE_RANK=.. MASTER_ADDR=.. scripts/launch_torchrun.sh <recipe.yaml> [extra args]}
shift
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
source .venv/bin/activate
GPUS_PER_NODE=${GPUS_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count())')}
export LITDATA_DISABLE_VERSION_CHECK=1
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
    -m parcae fit --config "$RECIPE" --trainer "${TRAINER_PRESET:-configs/trainer/ddp_multinode.yaml}" \
    --trainer.num_nodes "${NNODES:-1}" --trainer.devices "$GPUS_PER_NODE" "$@"
