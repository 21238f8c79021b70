#!/usr/bin/env bash
""":"
# Pretrain AdaMoE. One file, two ways to start it (it is valid bash and valid Python):
#
#   torchrun --nproc-per-node 8 launch/pretrain_adamoe.sh --config CONFIG [--key value ...]
#       torchrun runs this file as Python in every worker: the Python part at the bottom.
#       Multi node as usual: --nnodes N --node-rank R --master-addr HOST, or
#       --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID.
#
#   CONFIG=configs/cpu_adamoe_tiny.yaml launch/pretrain_adamoe.sh [--key value ...]
#   NNODES=8 NODE_RANK=$i MASTER_ADDR=node0 CONFIG=configs/gpu_mixtral_8x7b_adamoe.yaml \
#       launch/pretrain_adamoe.sh
#       Run directly, the bash part below is a wrapper: it picks GPUs or (without CUDA)
#       GPUS_PER_NODE=2 CPU processes over gloo, checks the options once before any process
#       starts (one error line, exit status 2), then starts torchrun on this same file.
#
# Options: a YAML file (--config, or CONFIG; default configs/cpu_adamoe_tiny.yaml), then overrides
# in Megatron's flag spelling. Relative paths are relative to the repository root.
set -euo pipefail

SCRIPT=launch/pretrain_adamoe.sh
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
CONFIG=${CONFIG:-configs/cpu_adamoe_tiny.yaml}
for arg in "$@"; do   # --help: the options, once, without starting anything
    if [ "$arg" = "--help" ] || [ "$arg" = "-h" ]; then exec "$PYTHON" "$SCRIPT" --help; fi
done

HAS_GPU=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_GPU" = 1 ]; then
    GPUS_PER_NODE=${GPUS_PER_NODE:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
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
# On SIGTERM torchrun forwards it to the workers, which finish the step and save (see
# exit_signal_handler); it waits this long for them before killing them.
SHUTDOWN_TIMEOUT=${SHUTDOWN_TIMEOUT:-240}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

DISTRIBUTED_ARGS=(--nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES" --max-restarts "$MAX_RESTARTS"
                  --shutdown-timeout "$SHUTDOWN_TIMEOUT")
if [ -n "$RDZV_BACKEND" ]; then
    DISTRIBUTED_ARGS+=(--rdzv-backend "$RDZV_BACKEND" --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT"
                       --rdzv-id "$RDZV_ID")
else
    DISTRIBUTED_ARGS+=(--node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR"
                       --master-port "$MASTER_PORT")
fi
TRAINING_ARGS=(--config "$CONFIG")

# Check the options for this world size first: one clear line and exit status 2 when wrong.
WORLD_SIZE=$WORLD_SIZE "$PYTHON" "$SCRIPT" --validate-only "${TRAINING_ARGS[@]}" "$@"

exec "$PYTHON" -m torch.distributed.run "${DISTRIBUTED_ARGS[@]}" "$SCRIPT" \
    "${TRAINING_ARGS[@]}" "$@"
":"""
# Python: one worker, as torchrun starts it (and the wrapper's --validate-only check). The entry
# point is megatron_adamoe.training.pretrain; this part only finds the repository and the config.
import os
import sys


def _worker() -> int:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # Set before torch starts CUDA (Megatron's recommendation for overlapping communication);
    # inert on CPU. Values already in the environment (the wrapper's, the user's) win.
    for name, value in (("CUDA_DEVICE_MAX_CONNECTIONS", "1"), ("NCCL_IB_TIMEOUT", "19"),
                        ("TORCH_NCCL_AVOID_RECORD_STREAMS", "1")):
        os.environ.setdefault(name, value)
    os.chdir(repo)
    sys.path.insert(0, repo)
    from megatron_adamoe.training.pretrain import main

    argv = sys.argv[1:]
    if not any(arg == "--config" or arg.startswith("--config=") for arg in argv):
        argv = ["--config", os.environ.get("CONFIG", "configs/cpu_adamoe_tiny.yaml"), *argv]
    return main(argv)


# Guarded: multiprocessing's spawn start method (dist_checkpointing's helpers) re-runs this file
# as the children's main module, where it must not start another worker.
if __name__ == "__main__":
    sys.exit(_worker())
