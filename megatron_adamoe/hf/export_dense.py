"""A dense run (``num_experts: 0``) -> a standard transformers Llama directory.

The weights load into ``LlamaForCausalLM`` with no remote code (the dense twin of an AdaMoE
family, e.g. the base Mo-LoRA adapts). The tokenizer is the run's sentencepiece model as
``AdaMoETokenizer`` (``tokenization_adamoe.py``, as in every export): transformers' own Llama
tokenizers add a BOS token and handle spaces their own way, so they would not give the ids the
model was trained on.
"""

from __future__ import annotations

import re

import torch

from megatron_adamoe.options import PretrainArguments

# The AdaMoE HF model's dense MLP (Mixtral's expert names) -> Llama's.
LLAMA_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_MLP = re.compile(r"(\.mlp\.)(w[123])(\.weight)$")


def llama_names(hf_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {_MLP.sub(lambda m: m[1] + LLAMA_MLP[m[2]] + m[3], k): v for k, v in hf_tensors.items()}


def llama_config(args: PretrainArguments, vocab_size: int, tokenizer):
    from transformers import LlamaConfig

    special = {
        name: getattr(tokenizer, name)
        for name in ("bos_token_id", "eos_token_id", "pad_token_id")
        if getattr(tokenizer, name) is not None
    }
    return LlamaConfig(
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
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        architectures=["LlamaForCausalLM"],
        **special,
    )
