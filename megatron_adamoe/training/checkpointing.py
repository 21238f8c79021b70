"""Save and resume with Megatron-Core's dist_checkpointing, published only when complete.

Layout under ``save``::

    latest_checkpointed_iteration.txt    the last complete checkpoint (written atomically)
    iter_0000200/                        a dist_checkpointing directory (torch_dist), plus
        config.yaml                      the resolved options of the run that wrote it
    iter_0000300.partial/                a save in progress, or one a crash interrupted

A save writes ``iter_N.partial``, waits for every rank, then rank 0 renames it to ``iter_N``
and rewrites the tracker; an interrupted save leaves the previous checkpoint as the latest.
Model weights are sharded tensors, so a checkpoint saved under one TP/EP/PP layout loads under
another. The optimizer moments and per-rank RNG states are restored under the same layout only
(Megatron's ChainedOptimizer groups state per layout); the iteration, data position and LR /
aux-coefficient schedules are restored under any layout.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from torch.distributed.checkpoint.api import CheckpointException

from megatron_adamoe.checkpoint_files import (
    PARTIAL,
    TRACKER,
    checkpoint_dir,
    damaged_files,
    iterations,
    latest_checkpoint,
    write_atomically,
)
from megatron_adamoe.errors import OptionError
from megatron_adamoe.mcore._compat import unreadable_checkpoint_format
from megatron_adamoe.options import PretrainArguments, resolved_yaml
from megatron_adamoe.storage import storage_problem

logger = logging.getLogger(__name__)

# Test hook: "ITERATION:MARKER" kills this process (SIGKILL) in the middle of the save of
# ITERATION, after the shards are written and before publication, if MARKER does not exist yet
# (it is created first, so a restarted run saves normally).
KILL_DURING_SAVE_ENV = "ADAMOE_TEST_KILL_DURING_SAVE"


# As Megatron-LM's training writes them: the distributed optimizer's state per data-parallel
# rank (its default format), the chained optimizers' keys without per-layout prefixes.
OPTIMIZER_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "chained_optim_avoid_prefix": True,
}


@dataclass
class TrainingPosition:
    iteration: int = 0
    consumed_samples: int = 0


def _layout(args: PretrainArguments) -> dict:
    """What the optimizer state's and RNG states' sharding depends on."""
    return {
        "world_size": dist.get_world_size(),
        "cp": parallel_state.get_context_parallel_world_size(),
        "distributed_optimizer": args.use_distributed_optimizer,
        "tp": parallel_state.get_tensor_model_parallel_world_size(),
        "pp": parallel_state.get_pipeline_model_parallel_world_size(),
        "ep": parallel_state.get_expert_model_parallel_world_size(),
        "etp": parallel_state.get_expert_tensor_parallel_world_size(),
    }


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object(state: Optional[dict]) -> ShardedObject:
    world, rank = dist.get_world_size(), dist.get_rank()
    return ShardedObject("rng_state", state, (world,), (rank,), replica_id=0)


def _sharded_state_dict(model, optimizer, is_loading: bool, with_optimizer: bool = True) -> dict:
    model_sd = model.module.sharded_state_dict()
    state = {"model": model_sd}
    if with_optimizer:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA
        )
    return state


# Options that set tensor shapes: resuming with another value cannot load the checkpoint.
SHAPE_OPTIONS = (
    "num_layers",
    "hidden_size",
    "ffn_hidden_size",
    "num_attention_heads",
    "num_query_groups",
    "num_experts",
    "moe_ffn_hidden_size",
    "adamoe_num_null_experts",
    "moe_layer_freq",
    "swiglu",
    "normalization",
    "position_embedding_type",
    "untie_embeddings_and_output_weights",
    "make_vocab_size_divisible_by",
)


def check_resumable(directory: str, args: PretrainArguments) -> None:
    """Before any rank reads it: the checkpoint's files are complete (else name the problem and
    the newest intact older checkpoint) and the options that set tensor shapes match those of
    the run that wrote it (its config.yaml), naming the first that differs."""
    problem = damaged_files(directory)
    if problem:
        root = os.path.dirname(os.path.normpath(directory))
        current = os.path.basename(os.path.normpath(directory))
        older = [
            i
            for i in iterations(root)
            if os.path.basename(checkpoint_dir(root, i)) < current
            and damaged_files(checkpoint_dir(root, i)) is None
        ]
        hint = (
            f"the previous checkpoint {os.path.basename(checkpoint_dir(root, older[-1]))} is "
            f"intact: resume from it with `echo {older[-1]} > {os.path.join(root, TRACKER)}`"
            if older
            else "no older intact checkpoint is there; restore the files or start "
            "afresh with another save directory"
        )
        raise OptionError(
            f"checkpoint ({directory!r}) must be complete to load ({problem}); {hint}"
        )
    newer = unreadable_checkpoint_format(directory)
    if newer:
        raise OptionError(f"checkpoint ({directory!r}) must be in a format this run reads: {newer}")
    saved = _saved_options(directory)
    for name in SHAPE_OPTIONS:
        if name in saved and saved[name] != getattr(args, name):
            raise OptionError(
                f"{name} ({getattr(args, name)!r}) must equal the checkpoint's "
                f"({saved[name]!r}) to load {directory}; set it back, or start a new run with "
                "another save directory"
            )
    _check_selection_biases(saved, args, directory)


def _selection_biases(options) -> dict:
    """{bias: the option that keeps it} of a run: the load controller's null bias (null experts
    with a target, a target schedule or expert bias) and expert bias. A checkpoint holds them
    as router buffers, which a run without them neither loads nor keeps."""
    get = options.get if isinstance(options, dict) else lambda name: getattr(options, name, None)
    biases = {}
    if get("moe_router_enable_expert_bias"):
        biases["expert bias"] = "moe_router_enable_expert_bias"
    if get("adamoe_num_null_experts") and (
        get("adamoe_target_load") is not None
        or get("adamoe_target_load_schedule") is not None
        or get("moe_router_enable_expert_bias")
    ):
        biases["null bias"] = (
            "adamoe_target_load_schedule"
            if get("adamoe_target_load_schedule") is not None
            else "adamoe_target_load"
        )
    return biases


def _check_selection_biases(saved: dict, args: PretrainArguments, directory: str) -> None:
    """A run without the checkpoint's learned selection biases would silently drop them (the
    routing, and so the load, would change): name the option that keeps them."""
    missing = set(_selection_biases(saved)) - set(_selection_biases(args))
    for bias in sorted(missing):
        option = _selection_biases(saved)[bias]
        raise OptionError(
            f"{option} ({getattr(args, option)!r}) must be set as the checkpoint's run set it "
            f"({saved.get(option)!r}) to load {directory}: it holds a learned {bias}, which "
            "this run would drop; set it back (or start a new run with another save directory)"
        )


def _saved_options(directory: str) -> dict:
    path = os.path.join(directory, "config.yaml")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def save_checkpoint(
    args: PretrainArguments, position: TrainingPosition, model, optimizer, scheduler
) -> str:
    """Write ``iter_N`` under ``args.save`` and publish it; returns its directory."""
    final = checkpoint_dir(args.save, position.iteration)
    partial = final + PARTIAL
    if dist.get_rank() == 0:
        os.makedirs(args.save, exist_ok=True)
        for name in os.listdir(args.save):  # saves a crash interrupted: never complete
            if name.endswith(PARTIAL):
                shutil.rmtree(os.path.join(args.save, name), ignore_errors=True)
        os.makedirs(partial)
    dist.barrier()
    state = _sharded_state_dict(model, optimizer, is_loading=False)
    state["rng_state"] = _rng_sharded_object(_rng_state())
    state["scheduler"] = scheduler.state_dict()
    state["position"] = {
        "iteration": position.iteration,
        "consumed_samples": position.consumed_samples,
    }
    state["layout"] = _layout(args)
    try:
        dist_checkpointing.save(state, partial)
        _maybe_kill_during_save(position.iteration)
        dist.barrier()
        if dist.get_rank() == 0:
            write_atomically(os.path.join(partial, "config.yaml"), resolved_yaml(args))
            if os.path.exists(final):  # the same iteration saved before a restart
                shutil.rmtree(final)
            os.replace(partial, final)
            write_atomically(os.path.join(args.save, TRACKER), f"{position.iteration}\n")
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        storage = storage_problem(error, args.save)
        if isinstance(error, CheckpointException):
            # dist_checkpointing raised this on every rank; only rank 0 (its coordinator) holds
            # the writers' failures, so rank 0's reading holds for all.
            verdict = [storage]
            dist.broadcast_object_list(verdict, src=0)
            storage = verdict[0]
        if storage is None:
            raise
        shutil.rmtree(partial, ignore_errors=True)
        previous = latest_checkpoint(args.save)
        kept = (
            f"{os.path.basename(previous)} is still the latest checkpoint"
            if previous
            else "no earlier checkpoint exists"
        )
        raise OptionError(
            f"save ({args.save!r}) {storage} while writing "
            f"{os.path.basename(final)}; {kept} and the partial save was removed; "
            "free space or point save elsewhere"
        ) from None
    dist.barrier()
    return final


def save_weights(args: PretrainArguments, model, root: str) -> str:
    """A weights-only checkpoint ``root/iter_0000000`` of an unwrapped GPTModel (what
    ``convert_checkpoint.py import-hf`` writes); it loads with ``finetune: true``."""
    final = checkpoint_dir(root, 0)
    os.makedirs(final)
    state = {
        "model": model.sharded_state_dict(),
        "position": {"iteration": 0, "consumed_samples": 0},
        "layout": _layout(args),
    }
    dist_checkpointing.save(state, final)
    write_atomically(os.path.join(final, "config.yaml"), resolved_yaml(args))
    write_atomically(os.path.join(root, TRACKER), "0\n")
    return final


def _maybe_kill_during_save(iteration: int) -> None:
    spec = os.environ.get(KILL_DURING_SAVE_ENV)
    if not spec or dist.get_rank() != 0:
        return
    target, _, marker = spec.partition(":")
    if int(target) == iteration and not os.path.exists(marker):
        open(marker, "w").close()
        logger.warning(
            "%s: killing rank 0 during the save of iteration %d", KILL_DURING_SAVE_ENV, iteration
        )
        os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(args: PretrainArguments, model, optimizer, scheduler) -> TrainingPosition:
    """Resume from the run's own latest checkpoint under ``save``, else start from ``load``
    (weights only under ``finetune``); a fresh start when neither holds one. Preferring ``save``
    lets a restarted fine-tuning run continue from its own progress."""
    own = latest_checkpoint(args.save)
    directory = own or latest_checkpoint(args.load)
    finetune = args.finetune and own is None
    if directory is None:
        if args.load is not None:
            raise OptionError(
                f"load ({args.load!r}) must contain a checkpoint ({TRACKER} or a "
                "dist_checkpointing directory); check the path"
            )
        return TrainingPosition()
    check_resumable(directory, args)
    common = dist_checkpointing.load_common_state_dict(directory)
    same_layout = common.get("layout") == _layout(args)
    restore_state = not finetune
    with_optimizer = restore_state and same_layout and not args.no_load_optim
    load_rng = restore_state and same_layout and not args.no_load_rng
    state = _sharded_state_dict(model, optimizer, is_loading=True, with_optimizer=with_optimizer)
    if load_rng:
        state["rng_state"] = _rng_sharded_object(None)
    loaded = dist_checkpointing.load(state, directory)
    model.module.load_state_dict(loaded["model"], strict=True)
    if with_optimizer:
        optimizer.load_state_dict(loaded["optimizer"])
    if restore_state and "scheduler" in common:
        scheduler.load_state_dict(common["scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"])
    if restore_state and not same_layout:
        logger.warning(
            "checkpoint layout %s differs from this run's %s: model weights resharded; the "
            "optimizer moments and RNG states start afresh (Megatron's optimizer groups its "
            "state per layout)",
            common.get("layout"),
            _layout(args),
        )
    saved_position = TrainingPosition(**common.get("position", {}))
    logger.info("loaded %s (iteration %d)", directory, saved_position.iteration)
    return TrainingPosition() if finetune else saved_position
