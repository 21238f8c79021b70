"""``adamoe-convert add-null-experts``: a Megatron dist checkpoint without null experts (a top-k
MoE) -> the same model with m null experts, as a Megatron dist checkpoint (paper section 3.5:
the router's output grows by m rows derived from the pretrained gate). Any saved TP/EP/PP
layout, no process group; the result loads with ``finetune: true`` (weights only, step 0) at any
layout, or continues with a fresh optimizer.

    adamoe-convert add-null-experts --load runs/top2/checkpoints --out ckpt/top2_adamoe \\
        --num-null-experts 4 --topk 3 [--null-router-init tile|random] [--target-load 1.5]

With tile init each null row copies a true row, so every token's true-expert logits are the
original ones and each true expert has a null twin of equal logit. ``--target-load`` turns on
the load controller (its null bias starts at ``--null-bias``, 0 by default; a large negative
value keeps the nulls unchosen, so the converted model computes the original's logits)."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from typing import Optional

import torch

from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.export import model_shape
from megatron_adamoe.hf.import_hf import (
    check_output_and_null_init,
    null_router_rows,
    save_megatron,
)
from megatron_adamoe.hf.mapping import dist_to_local
from megatron_adamoe.hf.megatron_checkpoint import (
    find_checkpoint,
    read_arguments,
    read_model_tensors,
)
from megatron_adamoe.storage import atomic_directory

logger = logging.getLogger("megatron_adamoe.convert")


def add_null_experts(
    load: str,
    out: str,
    num_null_experts: int,
    topk: Optional[int] = None,
    null_router_init: str = "tile",
    seed: int = 0,
    target_load: Optional[float] = None,
    null_bias: Optional[float] = None,
) -> str:
    """Write ``out`` from the checkpoint under ``load``; returns ``out``."""
    from megatron_adamoe.options.rules import validate

    check_output_and_null_init(out, null_router_init, "the checkpoint")
    if num_null_experts is None or num_null_experts < 1:
        raise OptionError(
            f"num_null_experts ({num_null_experts}) must be >= 1; pass --num-null-experts"
        )
    directory = find_checkpoint(load)
    args = read_arguments(directory)
    if args.adamoe_num_null_experts:
        raise OptionError(
            f"load ({directory!r}) already has m = {args.adamoe_num_null_experts} null experts; "
            "add-null-experts converts a model without them (fine-tune this one as it is)"
        )
    if null_bias is not None and target_load is None and args.adamoe_target_load is None:
        raise OptionError(
            f"null_bias ({null_bias}) needs the load controller (its null bias); pass "
            "--target-load too"
        )
    new = dataclasses.replace(
        args,
        adamoe_num_null_experts=num_null_experts,
        moe_router_topk=args.moe_router_topk if topk is None else topk,
        adamoe_flops_baseline_topk=args.adamoe_flops_baseline_topk or args.moe_router_topk,
        adamoe_target_load=args.adamoe_target_load if target_load is None else target_load,
    )
    validate(new, check_io=False, check_topology=False)  # k <= n + m and the rest, one line
    tensors = read_model_tensors(directory)
    shape = dataclasses.replace(
        model_shape(args),
        expert_bias=any(k.endswith("router.expert_bias") for k in tensors),
        null_bias=any(k.endswith("router.null_bias") for k in tensors),
    )
    local = dist_to_local(tensors, shape)
    for number, layer in enumerate(args.moe_layer_indices()):
        name = f"decoder.layers.{layer}.mlp.router.weight"
        gate = local[name]
        rows = null_router_rows(gate, num_null_experts, null_router_init, seed + number)
        local[name] = torch.cat([gate, rows])
        if new.adamoe_target_load is not None:
            local[f"decoder.layers.{layer}.mlp.router.null_bias"] = torch.tensor(
                [0.0 if null_bias is None else float(null_bias)]
            )
    vocab_size = tensors["embedding.word_embeddings.weight"].shape[0]
    with atomic_directory(out, "converting") as temporary:
        new.load = os.path.abspath(out)
        if args.tokenizer_model and os.path.isfile(args.tokenizer_model):
            shutil.copyfile(args.tokenizer_model, os.path.join(temporary, "tokenizer.model"))
            new.tokenizer_model = os.path.join(new.load, "tokenizer.model")
        save_megatron(new, local, temporary, vocab_size)
    logger.info(
        "added m = %d null experts (%s rows) to %s -> %s, top-%d",
        num_null_experts,
        null_router_init,
        directory,
        out,
        new.moe_router_topk,
    )
    return out
