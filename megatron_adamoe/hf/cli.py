"""``convert_checkpoint.py`` (console script ``adamoe-convert``): Megatron <-> Hugging Face.

    adamoe-convert export-hf --load runs/cpu_adamoe_tiny/checkpoints --out hf/adamoe_tiny
    adamoe-convert import-hf --hf path/to/mixtral --out ckpt/adamoe_mixtral \
        --num-null-experts 8 --topk 3 --tp 1 --ep 8 --pp 4
    adamoe-convert mixtral-to-adamoe --hf path/to/mixtral --out hf/adamoe_mixtral \
        --num-null-experts 8 --topk 3          # HF -> HF, no Megatron (for HF/DeepSpeed tuning)
    adamoe-convert add-null-experts --load runs/top2/checkpoints --out ckpt/top2_adamoe \
        --num-null-experts 4 --topk 3         # Megatron top-k -> Megatron AdaMoE
    adamoe-convert merge-lora --model hf/adamoe_mixtral --adapter out/qlora \
        --out hf/adamoe_mixtral_tuned          # (Q)LoRA adapters merged: HF -> HF

A bad input ends with one line, ``error: ...``, and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from typing import Optional

from megatron_adamoe.errors import OptionError, report

logger = logging.getLogger("megatron_adamoe.convert")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_checkpoint.py", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export-hf", help="Megatron dist checkpoint -> HF model dir")
    export.add_argument(
        "--load",
        required=True,
        help="save directory (its latest checkpoint) or an iter_N directory",
    )
    export.add_argument("--out", required=True, help="HF model directory to create")
    export.add_argument(
        "--tokenizer-model",
        default=None,
        help="sentencepiece model (default: the run's tokenizer_model)",
    )
    export.add_argument("--max-shard-size", default="5GB", help="safetensors shard size")
    imp = commands.add_parser("import-hf", help="HF Mixtral / AdaMoE -> Megatron dist checkpoint")
    imp.add_argument("--hf", required=True, help="local HF model directory (safetensors)")
    imp.add_argument("--out", required=True, help="checkpoint directory to create")
    imp.add_argument(
        "--num-null-experts",
        type=int,
        default=None,
        help="m null experts (Mixtral: default 0; AdaMoE: its own m)",
    )
    imp.add_argument(
        "--topk",
        type=int,
        default=None,
        help="k over n + m (default: the model's num_experts_per_tok)",
    )
    imp.add_argument("--tp", type=int, default=1, help="tensor-parallel size to fine-tune at")
    imp.add_argument("--ep", type=int, default=1, help="expert-parallel size to fine-tune at")
    imp.add_argument("--pp", type=int, default=1, help="pipeline-parallel size to fine-tune at")
    imp.add_argument(
        "--null-router-init",
        default="tile",
        choices=("tile", "random"),
        help="null router rows: tile the true rows (paper) or random",
    )
    imp.add_argument("--seed", type=int, default=0, help="seed of --null-router-init random")
    hf = commands.add_parser("mixtral-to-adamoe", help="HF Mixtral -> HF AdaMoE model dir")
    hf.add_argument("--hf", required=True, help="local HF Mixtral directory (safetensors)")
    hf.add_argument("--out", required=True, help="HF model directory to create")
    hf.add_argument("--num-null-experts", type=int, required=True, help="m null experts")
    hf.add_argument(
        "--topk",
        type=int,
        default=None,
        help="k over n + m (default: Mixtral's num_experts_per_tok)",
    )
    hf.add_argument(
        "--null-router-init",
        default="tile",
        choices=("tile", "random"),
        help="null router rows: tile the true rows (paper) or random",
    )
    hf.add_argument("--seed", type=int, default=0, help="seed of --null-router-init random")
    hf.add_argument("--max-shard-size", default="5GB", help="safetensors shard size")
    nulls = commands.add_parser(
        "add-null-experts", help="Megatron top-k checkpoint -> the same with m null experts"
    )
    nulls.add_argument("--load", required=True, help="save directory or an iter_N directory")
    nulls.add_argument("--out", required=True, help="checkpoint directory to create")
    nulls.add_argument("--num-null-experts", type=int, required=True, help="m null experts")
    nulls.add_argument("--topk", type=int, default=None, help="k over n + m (default: the run's)")
    nulls.add_argument(
        "--null-router-init",
        default="tile",
        choices=("tile", "random"),
        help="null router rows: tile the true rows (paper) or random",
    )
    nulls.add_argument("--seed", type=int, default=0, help="seed of --null-router-init random")
    nulls.add_argument(
        "--target-load", type=float, default=None, help="turn on the load controller at this load"
    )
    nulls.add_argument(
        "--null-bias", type=float, default=None, help="the controller's starting null bias (0)"
    )
    merge = commands.add_parser(
        "merge-lora", help="AdaMoE HF dir + adamoe-finetune's (Q)LoRA adapters -> HF dir"
    )
    merge.add_argument("--model", required=True, help="the AdaMoE HF directory tuned")
    merge.add_argument(
        "--adapter", required=True, help="adamoe-finetune --method lora|qlora output"
    )
    merge.add_argument("--out", required=True, help="HF model directory to create")
    merge.add_argument("--max-shard-size", default="5GB", help="safetensors shard size")
    return parser


def run(options: argparse.Namespace) -> str:
    if options.command == "mixtral-to-adamoe":
        from megatron_adamoe.hf.mixtral_to_adamoe import mixtral_to_adamoe

        return mixtral_to_adamoe(
            options.hf,
            options.out,
            options.num_null_experts,
            options.topk,
            options.null_router_init,
            options.seed,
            options.max_shard_size,
        )
    if options.command == "add-null-experts":
        from megatron_adamoe.hf.add_null_experts import add_null_experts

        return add_null_experts(
            options.load,
            options.out,
            options.num_null_experts,
            options.topk,
            options.null_router_init,
            options.seed,
            options.target_load,
            options.null_bias,
        )
    if options.command == "merge-lora":
        from megatron_adamoe.hf.merge_lora import merge_lora

        return merge_lora(options.model, options.adapter, options.out, options.max_shard_size)
    if options.command == "export-hf":
        from megatron_adamoe.hf.export import export_hf

        return export_hf(options.load, options.out, options.tokenizer_model, options.max_shard_size)
    for name in ("tp", "ep", "pp"):
        if getattr(options, name) < 1:
            raise OptionError(
                f"{name} ({getattr(options, name)}) must be >= 1; pass a positive --{name}"
            )
    from megatron_adamoe.hf.import_hf import import_hf

    return import_hf(
        options.hf,
        options.out,
        options.num_null_experts,
        options.topk,
        options.tp,
        options.ep,
        options.pp,
        options.null_router_init,
        options.seed,
    )


def main(argv: Optional[list] = None) -> int:
    options = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_adamoe.console import quiet_known_upstream_noise

    quiet_known_upstream_noise()
    warnings.filterwarnings("ignore", message=r"torch.distributed is disabled")
    try:
        out = run(options)
    except OptionError as error:
        return report(error)
    logger.info("wrote %s", out)
    return 0


def console_main() -> None:
    sys.exit(main())
