#!/usr/bin/env bash
# Pretrain AdaMoE with torchrun, on one node or many.
#
#   CONFIG=configs/cpu_adamoe_tiny.yaml launch/pretrain_adamoe.sh [--key value ...]
#   NNODES=8 NODE_RANK=$i MASTER_ADDR=node0 CONFIG=configs/gpu_mixtral_8x7b_adamoe.yaml \
#       launch/pretrain_adamoe.sh
#
# Without a GPU it falls back to GPUS_PER_NODE=2 CPU processes over gloo. Extra arguments are
# option overrides in Megatron's spelling and go to the entry point unchanged. The options are
# checked once before any process starts, so a bad value ends with one error line.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CONFIG=${CONFIG:-configs/cpu_adamoe_tiny.yaml}

HAS_GPU=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_GPU" = 1 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
    export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
    export NCCL_IB_TIMEOUT=${NCCL_IB_TIMEOUT:-19}
    export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
    export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
else
    GPUS_PER_NODE=${GPUS_PER_NODE:-2}   # CPU fallback: processes over gloo
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_BACKEND=${RDZV_BACKEND:-}           # "c10d" for elastic rendezvous (then RDZV_ID)
RDZV_ID=${RDZV_ID:-adamoe}
MAX_RESTARTS=${MAX_RESTARTS:-0}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

DISTRIBUTED_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --max-restarts "$MAX_RESTARTS")
if [ -n "$RDZV_BACKEND" ]; then
    DISTRIBUTED_ARGS+=(--rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
                       --rdzv-id "$RDZV_ID")
else
    DISTRIBUTED_ARGS+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
                       --master-port "$MASTER_PORT")
fi
TRAINING_ARGS=(--config "$CONFIG")

# Check the options for this world size first: one clear line and exit status 2 when wrong.
WORLD_SIZE=$WORLD_SIZE "$PYTHON" -m megatron_adamoe.training.pretrain --validate-only \
    "${TRAINING_ARGS[@]}" "$@"

exec "$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" \
    -m megatron_adamoe.training.pretrain "${TRAINING_ARGS[@]}" "$@"
