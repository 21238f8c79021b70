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

    from megatron_adamoe.hf.export import decoder_fields

    return LlamaConfig(
        **decoder_fields(args, vocab_size, tokenizer),
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        architectures=["LlamaForCausalLM"],
    )
