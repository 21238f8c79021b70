"""Pretrain an AdaMoE GPT on Megatron-Core: ``python -m megatron_adamoe.training.pretrain``.

    torchrun --nproc-per-node 2 -m megatron_adamoe.training.pretrain \
        --config configs/cpu_adamoe_tiny.yaml --train-iters 50

Built from Megatron-Core's primitives: ``parallel_state`` (TP/PP/EP/ETP/CP/DP), ``GPTModel`` with
the AdaMoE layer spec, ``DistributedDataParallel``, ``get_megatron_optimizer`` (the distributed
optimizer when asked), ``OptimizerParamScheduler``, ``get_forward_backward_func``,
``dist_checkpointing`` and ``GPTDataset``. Without CUDA it runs over gloo after
``megatron_adamoe.enable_cpu_mode()``. ``--validate-only`` checks the options and exits;
``--help`` lists every option (megatron_adamoe/options/schema.py, docs/options.md).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from megatron_adamoe.console import quiet_known_upstream_noise
from megatron_adamoe.errors import OptionError, TrainingHalted, report
from megatron_adamoe.options import load_arguments, parse_overrides

logger = logging.getLogger("megatron_adamoe.pretrain")

USAGE = """usage: torchrun [torchrun options] launch/pretrain_adamoe.sh [--config FILE.yaml]
                [--validate-only] [--<option> VALUE ...] [--<bool option> | --no-<bool option>]

A YAML file of options, then overrides in Megatron's flag spelling. The options:
"""


def _split_argv(argv: list[str]) -> tuple[Optional[str], bool, list[str]]:
    config, validate_only, rest = None, False, []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--config" and index + 1 < len(argv):
            config, index = argv[index + 1], index + 2
            continue
        if token.startswith("--config="):
            config = token.split("=", 1)[1]
        elif token == "--validate-only":
            validate_only = True
        else:
            rest.append(token)
        index += 1
    return config, validate_only, rest


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s",
        stream=sys.stdout,
    )
    quiet_known_upstream_noise()
    if "--help" in argv or "-h" in argv:
        from megatron_adamoe.options import describe

        print(USAGE + describe(markdown=False))
        return 0
    config_path, validate_only, rest = _split_argv(argv)
    try:
        args = load_arguments(config_path, parse_overrides(rest), world_size)
        if validate_only:
            return _validate_only(args, world_size)
        from megatron_adamoe.training.trainer import Trainer

        Trainer(args).train()
    except (OptionError, TrainingHalted) as error:  # one line, from any rank that meets it
        return report(error, None if validate_only else rank, world_size)
    return 0


def _validate_only(args, world_size: int) -> int:
    import torch

    from megatron_adamoe.training.model import check_device_support, transformer_config

    on_gpu = torch.cuda.is_available()
    check_device_support(args, on_gpu)
    transformer_config(args, on_gpu)  # AdaMoEConfig's own checks
    logger.info(
        "config ok: %d processes, data-parallel size %d, %d micro-batches/step",
        world_size,
        args.data_parallel_size,
        args.num_microbatches,
    )
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
