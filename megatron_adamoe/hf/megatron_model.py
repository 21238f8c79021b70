"""A Megatron-Core AdaMoE GPT in this one process (TP = EP = PP = 1), for conversion.

``import-hf`` builds the target model here on the meta device and saves it with
``dist_checkpointing``, which needs a process group: ``single_process_megatron`` starts a gloo
group of one rank (and CPU mode) when none exists, and tears down only what it started.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_adamoe.mcore.cpu import enable_cpu_mode
from megatron_adamoe.options import PretrainArguments, resolve, validate
from megatron_adamoe.training.model import build_model, transformer_config


@contextlib.contextmanager
def single_process_megatron(seed: int = 1234):
    started_group = not dist.is_initialized()
    if not started_group and dist.get_world_size() != 1:
        raise RuntimeError("single_process_megatron needs a world of one process")
    with tempfile.TemporaryDirectory(prefix="adamoe-convert-") as store_dir:
        if started_group:
            enable_cpu_mode()
            store = dist.FileStore(os.path.join(store_dir, "store"), 1)
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
        started_parallel = not parallel_state.model_parallel_is_initialized()
        try:
            if started_parallel:
                parallel_state.initialize_model_parallel(1, 1)
            model_parallel_cuda_manual_seed(seed)
            yield
        finally:
            if started_parallel:
                parallel_state.destroy_model_parallel()
            if started_group:
                dist.destroy_process_group()


def single_process_args(args: PretrainArguments) -> PretrainArguments:
    """The same model at TP = EP = PP = CP = 1 (dist checkpoints load across layouts)."""
    local = dataclasses.replace(
        args,
        tensor_model_parallel_size=1,
        pipeline_model_parallel_size=1,
        expert_model_parallel_size=1,
        expert_tensor_parallel_size=None,
        context_parallel_size=1,
        sequence_parallel=False,
        use_distributed_optimizer=False,
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        global_batch_size=None,
        moe_token_dispatcher_type="alltoall",
        world_size=1,
    )
    validate(local, check_io=False)
    return resolve(local)


def build_single_process_model(args: PretrainArguments, vocab_size: int, meta: bool = False):
    """GPTModel of ``args`` at TP = EP = PP = 1 on CPU with the local spec (the names
    ``hf.mapping`` knows); inside ``single_process_megatron``."""
    local = single_process_args(args)
    config = transformer_config(local, on_gpu=False)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = build_model(local, config, vocab_size, on_gpu=False)
    return model
