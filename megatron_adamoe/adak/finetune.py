"""``adamoe-finetune --method ada-k``: Ada-K's allocators trained by PPO on a frozen HF MoE model
(this project's AdaMoE, or transformers' Mixtral), in one process or data-parallel.

Each step takes the next global batch (``--per-device-batch-size`` x ranks rows, in the dataset's
order, the same whatever the layout) and each rank its own rows. Under torchrun the allocators are
DDP-wrapped; with ``--deepspeed`` a DeepSpeed engine (ZeRO stage 1 or 2 of its config) holds them
and their AdamW state. The frozen model is never wrapped: each rank keeps a full copy and computes
no gradient for it. Logs every ``--logging-steps``: loss, reward and the top-k baseline's, mean k
and true experts per layer, clip fraction (global-batch means; stdout and ``--metrics-file``).
The allocators are written next to ``--output-dir`` and renamed to it when complete
(``adak_allocators.safetensors``, ``adak_config.json``; ``AdaK.load(model, dir)`` reads them).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import torch

from megatron_adamoe.adak.model import AdaK
from megatron_adamoe.adak.trainer import AdaKOptions, AdaKTrainer, AllocatorHeads
from megatron_adamoe.errors import OptionError

logger = logging.getLogger("megatron_adamoe.finetune")


def adak_options(options) -> AdaKOptions:
    return AdaKOptions(
        lam=options.adak_lambda,
        clip=options.ppo_clip,
        gamma=options.ppo_gamma,
        ppo_epochs=options.ppo_epochs,
        lr=options.learning_rate,
        weight_decay=options.weight_decay,
    )


FROZEN_MODEL_FLAGS = ("aux_loss_coef", "aux_loss_coef_schedule", "aux_loss_coef_per_epoch")


def unused_flags(options) -> list[str]:
    """The flags set that train the model's own routers, which Ada-K leaves frozen (a protocol
    may pass them to every arm): named in a warning, not applied."""
    return [name for name in FROZEN_MODEL_FLAGS if getattr(options, name, None) is not None]


def train_allocators(options, model, dataset) -> str:
    """Train; write the allocators; return their directory."""
    for name in unused_flags(options):
        logger.warning(
            "ada-k: %s (%s) does not apply (the model and its routers are frozen; only the "
            "allocators train): ignored",
            name,
            getattr(options, name),
        )
    if options.resume:
        raise OptionError(
            "resume (true) is not available for --method ada-k (no checkpoints are kept; a run "
            "is short): start the run again"
        )
    rank, world = _distributed()
    if options.gradient_accumulation_steps != 1:
        raise OptionError(
            f"gradient_accumulation_steps ({options.gradient_accumulation_steps}) must be 1 for "
            "ada-k (each step is one PPO rollout); raise --per-device-batch-size instead"
        )
    settings = adak_options(options)
    adak = AdaK(model, options.adak_max_k)
    heads, optimizer = _wrap(AllocatorHeads(adak.allocators), settings, options, world)
    trainer = AdaKTrainer(model, adak, settings, options.seed, heads=heads, optimizer=optimizer)
    per_rank = options.per_device_batch_size
    global_rows = per_rank * world
    collate = getattr(dataset, "collate", None) or torch.utils.data.default_collate
    metrics = open(options.metrics_file, "a") if options.metrics_file and rank == 0 else None
    try:
        for step in range(options.max_steps):
            first = (step * global_rows) % len(dataset)
            rows = [(first + rank * per_rank + i) % len(dataset) for i in range(per_rank)]
            batch = collate([dataset[i] for i in rows])
            logs = trainer.train_step(
                batch["input_ids"],
                batch.get("attention_mask"),
                batch.get("labels"),
                rows=torch.arange(rank * per_rank, (rank + 1) * per_rank),
                global_rows=global_rows,
            )
            if (step + 1) % options.logging_steps == 0 or step + 1 == options.max_steps:
                record = {"step": step + 1, **logs}
                if rank == 0:
                    logger.info("ada-k %s", json.dumps(record))
                if metrics is not None:
                    metrics.write(json.dumps(record) + "\n")
                    metrics.flush()
    finally:
        if metrics is not None:
            metrics.close()
    if rank == 0:
        _save(adak, options.output_dir)
    if world > 1:
        torch.distributed.barrier()
    return options.output_dir


def _distributed() -> tuple[int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if world > 1:
        return torch.distributed.get_rank(), world
    return 0, 1


def _wrap(heads: AllocatorHeads, settings: AdaKOptions, options, world: int):
    """(the heads as the trainer calls them, an optimizer or None when an engine steps)."""
    if options.deepspeed is not None:
        import deepspeed

        config = _deepspeed_config(options.deepspeed, options, world)
        optimizer = torch.optim.AdamW(
            heads.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        engine, _, _, _ = deepspeed.initialize(model=heads, optimizer=optimizer, config=config)
        return engine, None
    if world > 1:
        return torch.nn.parallel.DistributedDataParallel(heads), torch.optim.AdamW(
            heads.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
    return heads, None


def _deepspeed_config(path: str, options, world: int) -> dict:
    """The DeepSpeed config with what the HF Trainer would fill in ("auto") set from the flags;
    the optimizer is this trainer's AdamW (the config's is dropped), ZeRO stage 1 or 2."""
    with open(path) as handle:
        config = json.load(handle)
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2):
        raise OptionError(
            f"deepspeed ({path!r}) ZeRO stage ({stage}) must be 0, 1 or 2 for ada-k (only the "
            "small allocators train; the frozen model is not partitioned); use zero2.json"
        )
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    config.update(
        train_micro_batch_size_per_gpu=options.per_device_batch_size,
        gradient_accumulation_steps=1,
        train_batch_size=options.per_device_batch_size * world,
        zero_allow_untested_optimizer=True,
    )
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"] = {"enabled": bool(options.bf16)}
    config["gradient_clipping"] = 0.0  # as in one process: the paper clips nothing
    return config


def _save(adak: AdaK, out: str) -> None:
    temporary = out.rstrip(os.sep) + ".writing"
    shutil.rmtree(temporary, ignore_errors=True)
    adak.save(temporary)
    os.replace(temporary, out)
