"""Megatron dist checkpoint (any TP/EP/PP layout) -> Hugging Face AdaMoE model directory (a
dense run: a Llama directory, ``export_dense``).

The directory holds ``config.json`` (with ``auto_map``), ``configuration_adamoe.py`` and
``modeling_adamoe.py``, sharded ``model-*.safetensors`` with their index,
``generation_config.json`` and the run's sentencepiece tokenizer (``tokenizer.model``,
``tokenization_adamoe.py``). It is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Optional

import torch

from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.configuration_adamoe import AdaMoEHFConfig
from megatron_adamoe.hf.mapping import (
    ROUTER_DTYPE_TO_HF,
    ModelShape,
    dist_to_local,
    local_to_hf,
)
from megatron_adamoe.hf.megatron_checkpoint import (
    find_checkpoint,
    read_arguments,
    read_model_tensors,
)
from megatron_adamoe.hf.modeling_adamoe import AdaMoEForCausalLM
from megatron_adamoe.hf.strict import load_strictly
from megatron_adamoe.hf.tokenization_adamoe import AdaMoETokenizer
from megatron_adamoe.ops.routing import expected_load
from megatron_adamoe.options import PretrainArguments
from megatron_adamoe.options.schedule import StepSchedule
from megatron_adamoe.storage import atomic_directory, check_writable

logger = logging.getLogger(__name__)


def check_exportable(args: PretrainArguments) -> None:
    """The Megatron options the Mixtral-style HF model reproduces; others fail with one line."""
    wanted = {"normalization": "RMSNorm", "position_embedding_type": "rope", "swiglu": True}
    for name, value in wanted.items():
        if getattr(args, name) != value:
            raise OptionError(
                f"{name} ({getattr(args, name)!r}) must be {value!r} to export; the "
                "Hugging Face AdaMoE model is a Mixtral-style decoder"
            )


def model_shape(args: PretrainArguments) -> ModelShape:
    return ModelShape(
        num_layers=args.num_layers,
        moe_layers=tuple(args.moe_layer_indices()),
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups or args.num_attention_heads,
        head_dim=args.hidden_size // args.num_attention_heads,
        num_experts=args.num_experts,
        tied_embeddings=not args.untie_embeddings_and_output_weights,
    )


def final_target_load(args: PretrainArguments):
    """The controller's target at the end of the run that wrote ``args`` (the balanced load
    k n / (n + m) when only expert bias holds it)."""
    if args.adamoe_target_load_schedule:
        return StepSchedule.parse(args.adamoe_target_load_schedule, "adamoe_target_load_schedule")(
            args.train_iters
        )
    if args.adamoe_target_load is not None:
        return args.adamoe_target_load
    return expected_load(args.moe_router_topk, args.num_experts, args.adamoe_num_null_experts)


def decoder_fields(args: PretrainArguments, vocab_size: int, tokenizer=None) -> dict:
    """The HF config fields every exported decoder shares (AdaMoE's and the dense Llama's): its
    sizes, attention, positions, norm, and the tokenizer's special ids."""
    special = {}
    if tokenizer is not None:
        ids = {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        }
        special = {name: value for name, value in ids.items() if value is not None}
    return dict(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.ffn_hidden_size or 4 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_query_groups or args.num_attention_heads,
        head_dim=args.hidden_size // args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings or args.seq_length,
        rms_norm_eps=args.norm_epsilon,
        rope_theta=float(args.rotary_base),
        **special,
    )


def hf_config(
    args: PretrainArguments, vocab_size: int, tokenizer=None, shape: Optional[ModelShape] = None
) -> AdaMoEHFConfig:
    fields = decoder_fields(args, vocab_size, tokenizer)
    return AdaMoEHFConfig(
        **fields,
        moe_intermediate_size=args.moe_ffn_hidden_size or fields["intermediate_size"],
        num_local_experts=args.num_experts,
        num_null_experts=args.adamoe_num_null_experts,
        num_experts_per_tok=args.moe_router_topk,
        null_expert_type=args.adamoe_null_expert_type,
        router_weight_norm=args.adamoe_weight_norm,
        router_dtype=ROUTER_DTYPE_TO_HF[args.moe_router_dtype],
        moe_layers=args.moe_layer_indices(),
        router_mode=args.adamoe_router_mode,
        router_topp_threshold=args.adamoe_topp_threshold,
        router_expert_bias=bool(shape and shape.expert_bias),
        router_null_bias=bool(shape and shape.null_bias),
        router_target_load=final_target_load(args) if shape and shape.null_bias else None,
        router_aux_loss_coef=args.moe_aux_loss_coeff or 0.0,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        architectures=["AdaMoEForCausalLM"],
    )


SHARD_SIZE = re.compile(r"\d+(?:[KMG]i?B)?")


def export_hf(
    load: str, out: str, tokenizer_model: Optional[str] = None, max_shard_size: str = "5GB"
) -> str:
    """Write the HF model directory ``out`` from the checkpoint under ``load``; returns ``out``.
    Cheap checks (paths, options, tokenizer) come before the weights are read."""
    if os.path.exists(out):
        raise OptionError(f"out ({out!r}) must not exist yet; remove it or pick another path")
    check_writable(
        "out",
        os.path.dirname(os.path.abspath(out)),
        "the export is written next to it first; pick a writable place",
    )
    if not SHARD_SIZE.fullmatch(str(max_shard_size)):
        raise OptionError(
            f"max_shard_size ({max_shard_size!r}) must be a byte count like 5GB, "
            "500MB or 1000000; fix --max-shard-size"
        )
    directory = find_checkpoint(load)
    args = read_arguments(directory)
    check_exportable(args)
    tokenizer = _load_tokenizer(tokenizer_model or args.tokenizer_model)
    tensors = read_model_tensors(directory)
    shape = dataclasses.replace(  # the routers' selection biases, when the run had them
        model_shape(args),
        expert_bias=any(k.endswith("router.expert_bias") for k in tensors),
        null_bias=any(k.endswith("router.null_bias") for k in tensors),
    )
    hf_tensors = local_to_hf(dist_to_local(tensors, shape), shape)
    vocab_size = tensors["embedding.word_embeddings.weight"].shape[0]
    if tokenizer.vocab_size > vocab_size:
        raise OptionError(
            f"tokenizer_model ({tokenizer.vocab_file!r}) must have at most the "
            f"model's {vocab_size} tokens (it has {tokenizer.vocab_size}); pass "
            "the run's tokenizer"
        )
    if args.is_dense:
        from transformers import LlamaForCausalLM

        from megatron_adamoe.hf.export_dense import llama_config, llama_names

        config, model_class = llama_config(args, vocab_size, tokenizer), LlamaForCausalLM
        hf_tensors = llama_names(hf_tensors)
    else:
        config, model_class = hf_config(args, vocab_size, tokenizer, shape), AdaMoEForCausalLM
    # The stored dtype, under its name in this transformers (``dtype``; ``torch_dtype`` < 4.56).
    setattr(
        config,
        "dtype" if hasattr(config, "dtype") else "torch_dtype",
        tensors["embedding.word_embeddings.weight"].dtype,
    )
    with torch.device("meta"):
        model = model_class(config)
    if config.tie_word_embeddings:  # Megatron's output layer is the embedding
        hf_tensors["lm_head.weight"] = hf_tensors["model.embed_tokens.weight"]
    load_strictly(model, hf_tensors, what=f"checkpoint {directory}")
    if config.tie_word_embeddings:
        model.tie_weights()  # one parameter again, saved once
    model.generation_config.do_sample = False
    # Megatron pads the vocabulary past the tokenizer's pieces; never generate those ids.
    padding_ids = list(range(tokenizer.vocab_size, vocab_size))
    model.generation_config.suppress_tokens = padding_ids or None

    with atomic_directory(out, "exporting") as temporary:
        if not args.is_dense:  # a dense model is transformers' own Llama
            type(config).register_for_auto_class()
            type(model).register_for_auto_class("AutoModelForCausalLM")
        type(tokenizer).register_for_auto_class("AutoTokenizer")
        model.save_pretrained(temporary, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
    logger.info("exported %s -> %s", directory, out)
    return out


def _load_tokenizer(path: Optional[str]) -> AdaMoETokenizer:
    if path is None or not os.path.isfile(path):
        raise OptionError(
            f"tokenizer_model ({path!r}) must be the run's sentencepiece model; "
            "pass --tokenizer-model PATH"
        )
    try:
        return AdaMoETokenizer(vocab_file=path)
    except (RuntimeError, OSError) as error:  # sentencepiece's error for a non-model file
        raise OptionError(
            f"tokenizer_model ({path!r}) must be a sentencepiece model; pass the "
            f"run's ({type(error).__name__})"
        ) from None
