"""Megatron dist checkpoint (any TP/EP/PP layout) -> Hugging Face AdaMoE model directory.

The directory holds ``config.json`` (with ``auto_map``), ``configuration_adamoe.py`` and
``modeling_adamoe.py``, sharded ``model-*.safetensors`` with their index,
``generation_config.json`` and the run's sentencepiece tokenizer (``tokenizer.model``,
``tokenization_adamoe.py``). It is written under a temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

from megatron_adamoe.hf.configuration_adamoe import AdaMoEHFConfig
from megatron_adamoe.hf.mapping import ModelShape, dist_to_local, local_to_hf
from megatron_adamoe.hf.megatron_checkpoint import read_checkpoint
from megatron_adamoe.hf.modeling_adamoe import AdaMoEForCausalLM
from megatron_adamoe.hf.strict import load_strictly
from megatron_adamoe.hf.tokenization_adamoe import AdaMoETokenizer
from megatron_adamoe.training.arguments import PretrainArguments
from megatron_adamoe.training.metrics import moe_layer_indices

logger = logging.getLogger(__name__)

ROUTER_DTYPES = {None: None, "fp32": "float32", "fp64": "float64"}
LAYERNORM_EPSILON = 1e-5  # Megatron-Core's default; the pretraining options do not change it


def check_exportable(args: PretrainArguments) -> None:
    """The Megatron options the Mixtral-style HF model reproduces; others fail with one line."""
    wanted = {"normalization": "RMSNorm", "position_embedding_type": "rope", "swiglu": True}
    for name, value in wanted.items():
        if getattr(args, name) != value:
            raise ValueError(f"{name} ({getattr(args, name)!r}) must be {value!r} to export; the "
                             "Hugging Face AdaMoE model is a Mixtral-style decoder")


def model_shape(args: PretrainArguments) -> ModelShape:
    return ModelShape(
        num_layers=args.num_layers,
        moe_layers=tuple(moe_layer_indices(args)),
        hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups or args.num_attention_heads,
        head_dim=args.hidden_size // args.num_attention_heads,
        num_experts=args.num_experts,
        tied_embeddings=not args.untie_embeddings_and_output_weights,
    )


def hf_config(args: PretrainArguments, vocab_size: int, tokenizer=None) -> AdaMoEHFConfig:
    ffn = args.ffn_hidden_size or 4 * args.hidden_size
    special = {}
    if tokenizer is not None:
        ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
               "pad_token_id": tokenizer.pad_token_id}
        special = {name: value for name, value in ids.items() if value is not None}
    return AdaMoEHFConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=ffn,
        moe_intermediate_size=args.moe_ffn_hidden_size or ffn,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_query_groups or args.num_attention_heads,
        head_dim=args.hidden_size // args.num_attention_heads,
        max_position_embeddings=args.max_position_embeddings or args.seq_length,
        rms_norm_eps=LAYERNORM_EPSILON,
        rope_theta=float(args.rotary_base),
        num_local_experts=args.num_experts,
        num_null_experts=args.adamoe_num_null_experts,
        num_experts_per_tok=args.moe_router_topk,
        null_expert_type=args.adamoe_null_expert_type,
        router_weight_norm=args.adamoe_weight_norm,
        router_dtype=ROUTER_DTYPES[args.moe_router_dtype],
        moe_layers=moe_layer_indices(args),
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        architectures=["AdaMoEForCausalLM"],
        **special,
    )


def export_hf(load: str, out: str, tokenizer_model: str = None,
              max_shard_size: str = "2GB") -> str:
    """Write the HF model directory ``out`` from the checkpoint under ``load``; returns ``out``."""
    if os.path.exists(out):
        raise ValueError(f"out ({out!r}) must not exist yet; remove it or pick another path")
    checkpoint = read_checkpoint(load)
    args = checkpoint.args
    check_exportable(args)
    tokenizer_model = tokenizer_model or args.tokenizer_model
    if tokenizer_model is None or not os.path.isfile(tokenizer_model):
        raise ValueError(f"tokenizer_model ({tokenizer_model!r}) must be the run's sentencepiece "
                         "model; pass --tokenizer-model PATH")
    tokenizer = AdaMoETokenizer(vocab_file=tokenizer_model)
    shape = model_shape(args)
    hf_tensors = local_to_hf(dist_to_local(checkpoint.tensors, shape), shape)
    vocab_size = checkpoint.tensors["embedding.word_embeddings.weight"].shape[0]
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"tokenizer_model ({tokenizer_model!r}) must have at most the model's "
                         f"{vocab_size} tokens (it has {tokenizer.vocab_size}); pass the run's")
    config = hf_config(args, vocab_size, tokenizer)
    config.dtype = checkpoint.tensors["embedding.word_embeddings.weight"].dtype
    with torch.device("meta"):
        model = AdaMoEForCausalLM(config)
    load_strictly(model, hf_tensors, what=f"checkpoint {checkpoint.directory}")
    model.generation_config.do_sample = False

    temporary = f"{out.rstrip(os.sep)}.tmp-{os.getpid()}"
    try:
        type(config).register_for_auto_class()
        type(model).register_for_auto_class("AutoModelForCausalLM")
        type(tokenizer).register_for_auto_class("AutoTokenizer")
        model.save_pretrained(temporary, max_shard_size=max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(temporary)
        os.replace(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    logger.info("exported %s -> %s", checkpoint.directory, out)
    return out
