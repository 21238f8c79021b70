"""Process groups of a pretraining run: NCCL on GPU, gloo on CPU (after ``enable_cpu_mode``),
Megatron's parallel state and seeds; and their teardown."""

from __future__ import annotations

import os
import random
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from megatron_adamoe.errors import OptionError
from megatron_adamoe.mcore import enable_cpu_mode
from megatron_adamoe.options import PretrainArguments

TIMEOUT = timedelta(minutes=10)


def initialize(args: PretrainArguments) -> bool:
    """Process group, Megatron's parallel state and seeds; returns whether this runs on GPU."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        enable_cpu_mode()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        _init_process_group("nccl" if on_gpu else "gloo", TIMEOUT)
    if dist.get_world_size() != args.world_size:
        raise OptionError(
            f"world size ({dist.get_world_size()}) must match the one the options "
            f"were checked for ({args.world_size}); launch with torchrun"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    # Megatron's _set_random_seed: one seed per pipeline stage, model-parallel RNG states.
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return on_gpu


def _init_process_group(backend: str, timeout: timedelta) -> None:
    """env:// initialisation; under torchrun, on a store prefix of its own per restart attempt.

    torchrun's agent keeps one TCPStore for the life of the job. Restarted workers
    (``--max-restarts``) would otherwise find the previous attempt's keys under the same group
    names and try to connect to the dead workers' addresses.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"megatron_adamoe/attempt_{attempt}", store),
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
        timeout=timeout,
    )


def device():
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def is_logging_rank() -> bool:
    return dist.get_rank() == 0


def shutdown() -> None:
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
