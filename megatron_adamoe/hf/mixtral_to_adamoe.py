"""Hugging Face Mixtral -> Hugging Face AdaMoE, without Megatron (the paper's own starting point).

The tensors keep Mixtral's names; each router gains m null rows (``null_router_init``: ``tile``,
the AdaMoE authors' choice, or ``random``; the rules of ``import-hf``). The output directory holds
``config.json`` (``AdaMoEForCausalLM`` with ``auto_map``), the model files, safetensors shards and
Mixtral's tokenizer files as they were. With m = 0 the AdaMoE model computes Mixtral's logits.
Mixtral's settings carry over; the one that changes is ``router_aux_loss_coef``, rescaled to the
same pressure on AdaMoE's loss (``aux_loss_coef_from_mixtral``; logged). Written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch

from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.configuration_adamoe import AdaMoEHFConfig
from megatron_adamoe.hf.import_hf import (
    _add_null_router_rows,
    aux_loss_coef_from_mixtral,
    check_output_and_null_init,
    read_hf_config,
    read_hf_tensors,
)
from megatron_adamoe.hf.modeling_adamoe import AdaMoEForCausalLM
from megatron_adamoe.hf.strict import load_strictly
from megatron_adamoe.storage import atomic_directory

logger = logging.getLogger(__name__)

TOKENIZER_FILES = (
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
)


def adamoe_config(mixtral: dict, num_null_experts: int, topk: int) -> AdaMoEHFConfig:
    heads = mixtral["num_attention_heads"]
    rope = mixtral.get("rope_parameters") or {}
    total = mixtral["num_local_experts"] + num_null_experts
    if not isinstance(topk, int) or not 1 <= topk <= total:
        raise OptionError(
            f"topk ({topk}) must be in [1, n + m = {total}] (n = {mixtral['num_local_experts']} "
            f"true experts of the Mixtral model, m = {num_null_experts} null experts); lower "
            "--topk or add --num-null-experts"
        )
    return AdaMoEHFConfig(
        vocab_size=mixtral["vocab_size"],
        hidden_size=mixtral["hidden_size"],
        intermediate_size=mixtral["intermediate_size"],
        moe_intermediate_size=mixtral["intermediate_size"],
        num_hidden_layers=mixtral["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=mixtral.get("num_key_value_heads") or heads,
        head_dim=mixtral["hidden_size"] // heads,
        max_position_embeddings=mixtral.get("max_position_embeddings", 4096),
        rms_norm_eps=float(mixtral.get("rms_norm_eps", 1e-5)),
        rope_theta=float(mixtral.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        num_local_experts=mixtral["num_local_experts"],
        num_null_experts=num_null_experts,
        num_experts_per_tok=topk,
        router_dtype="float32",
        output_router_logits=bool(mixtral.get("output_router_logits", False)),
        router_aux_loss_coef=aux_loss_coef_from_mixtral(mixtral),
        tie_word_embeddings=bool(mixtral.get("tie_word_embeddings", False)),
        bos_token_id=mixtral.get("bos_token_id"),
        eos_token_id=mixtral.get("eos_token_id"),
        pad_token_id=mixtral.get("pad_token_id"),
        architectures=["AdaMoEForCausalLM"],
    )


def mixtral_to_adamoe(
    hf_dir: str,
    out: str,
    num_null_experts: int,
    topk=None,
    null_router_init: str = "tile",
    seed: int = 0,
    max_shard_size: str = "5GB",
) -> str:
    """Write the AdaMoE HF directory ``out`` from the Mixtral directory ``hf_dir``."""
    check_output_and_null_init(out, null_router_init, "the model")
    mixtral = read_hf_config(hf_dir)
    if mixtral["architectures"][0] != "MixtralForCausalLM":
        raise OptionError(
            f"architectures ({mixtral['architectures']!r}) must be "
            "['MixtralForCausalLM']; an AdaMoE model is converted already"
        )
    if num_null_experts is None or num_null_experts < 0:
        raise OptionError(
            f"num_null_experts ({num_null_experts}) must be >= 0; pass --num-null-experts"
        )
    config = adamoe_config(
        mixtral, num_null_experts, mixtral["num_experts_per_tok"] if topk is None else topk
    )
    tensors = read_hf_tensors(hf_dir)
    if num_null_experts:
        tensors = _add_null_router_rows(tensors, num_null_experts, null_router_init, seed)
    dtype = tensors["model.embed_tokens.weight"].dtype
    setattr(config, "dtype" if hasattr(config, "dtype") else "torch_dtype", dtype)
    with torch.device("meta"):
        model = AdaMoEForCausalLM(config)
    if config.tie_word_embeddings:
        tensors.setdefault("lm_head.weight", tensors["model.embed_tokens.weight"])
    load_strictly(model, tensors, what=f"Mixtral checkpoint {hf_dir}")
    if config.tie_word_embeddings:
        model.tie_weights()

    with atomic_directory(out, "converting") as temporary:
        type(config).register_for_auto_class()
        type(model).register_for_auto_class("AutoModelForCausalLM")
        model.save_pretrained(temporary, max_shard_size=max_shard_size, safe_serialization=True)
        for name in TOKENIZER_FILES:  # Mixtral's tokenizer, as it was
            if os.path.isfile(os.path.join(hf_dir, name)):
                shutil.copyfile(os.path.join(hf_dir, name), os.path.join(temporary, name))
    logger.info(
        "converted %s -> %s (m = %d null experts, top-%d); router_aux_loss_coef %.4g: Mixtral's "
        "%.4g on its pooled loss = %.4g x k (%d) / layers (%d) on AdaMoE's per-layer sum",
        hf_dir,
        out,
        num_null_experts,
        config.num_experts_per_tok,
        config.router_aux_loss_coef,
        float(mixtral.get("router_aux_loss_coef", 0.001)),
        float(mixtral.get("router_aux_loss_coef", 0.001)),
        mixtral["num_experts_per_tok"],
        mixtral["num_hidden_layers"],
    )
    return out
