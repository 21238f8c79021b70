"""Tiny random models in Hugging Face form for the convert and DeepSpeed tiers: a transformers
``MixtralForCausalLM``, and an AdaMoE model with a sentencepiece tokenizer (remote code)."""

from __future__ import annotations

import os

import torch

N, K = 4, 2


def tiny_mixtral(directory, seed: int = 0, vocab_size: int = 256):
    """A random MixtralForCausalLM saved with transformers' own save_pretrained (GQA, untied)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=N,
        num_experts_per_tok=K,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def tiny_llama_config(vocab_size: int = 256):
    """A tiny transformers LlamaConfig (2 layers, GQA): the dense base of the Mo-LoRA tests."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


def one_layer_adamoe_config():
    """A one-layer AdaMoEHFConfig (n = 2 true, m = 2 null experts, top-2) for in-process tests."""
    from megatron_adamoe.hf import AdaMoEHFConfig

    return AdaMoEHFConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=2,
        num_null_experts=2,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )


def tiny_adamoe(directory, corpus_text: str, null_bias: float = 1.5, seed: int = 0):
    """A random AdaMoE model (n = 4 true + m = 4 null experts, top-3, 2 layers) with a
    sentencepiece tokenizer trained on ``corpus_text``, saved as an HF directory (remote code).
    Its routers start with a null bias (the load controller's, target load 1.0) that favours
    the nulls: null picks leave experts empty in small batches."""
    import sentencepiece as spm

    from megatron_adamoe.hf import AdaMoEForCausalLM, AdaMoEHFConfig, AdaMoETokenizer

    os.makedirs(directory, exist_ok=True)
    text = os.path.join(directory, "corpus.txt")
    with open(text, "w") as handle:
        handle.write(corpus_text)
    prefix = os.path.join(directory, "sp")
    spm.SentencePieceTrainer.train(
        input=text,
        model_prefix=prefix,
        vocab_size=200,
        model_type="bpe",
        minloglevel=2,
        eos_id=2,
        bos_id=1,
        pad_id=3,
        unk_id=0,
    )
    tokenizer = AdaMoETokenizer(prefix + ".model")
    config = AdaMoEHFConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_null_experts=4,
        num_experts_per_tok=3,
        max_position_embeddings=64,
        router_null_bias=True,
        router_target_load=1.0,
        router_aux_loss_coef=0.05,
        architectures=["AdaMoEForCausalLM"],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = AdaMoEForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.block_sparse_moe.gate.weight.mul_(10.0)
            layer.block_sparse_moe.null_bias.fill_(null_bias)
    type(config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    type(tokenizer).register_for_auto_class("AutoTokenizer")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    os.remove(text)
    return directory


def save_standard_tokenizer(directory, kind: str, seed: int = 0):
    """A tokenizer as a Hugging Face model directory ships it, trained on synthetic text (200
    pieces): ``fast`` (transformers' tokenizer.json, a byte-level BPE) or ``sentencepiece``
    (tokenizer.model and a tokenizer_config naming LlamaTokenizer, as Mixtral ships it)."""
    import json

    from megatron_adamoe.data.corpus import synthetic_documents

    os.makedirs(directory, exist_ok=True)
    documents = synthetic_documents(80, seed=seed)
    if kind == "fast":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import PreTrainedTokenizerFast

        tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        special = ["<unk>", "<s>", "</s>"]
        tokenizer.train_from_iterator(
            documents, trainers.BpeTrainer(vocab_size=200, special_tokens=special)
        )
        PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
        ).save_pretrained(directory)
    elif kind == "sentencepiece":
        import sentencepiece as spm

        text = os.path.join(directory, "corpus.txt")
        with open(text, "w") as handle:
            handle.write("\n".join(documents))
        spm.SentencePieceTrainer.train(
            input=text,
            model_prefix=os.path.join(directory, "tokenizer"),
            vocab_size=200,
            model_type="bpe",
            minloglevel=2,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
        )
        for leftover in ("corpus.txt", "tokenizer.vocab"):
            os.remove(os.path.join(directory, leftover))
        with open(os.path.join(directory, "tokenizer_config.json"), "w") as handle:
            json.dump(
                {
                    "tokenizer_class": "LlamaTokenizer",
                    "bos_token": "<s>",
                    "eos_token": "</s>",
                    "unk_token": "<unk>",
                    "add_bos_token": False,
                },
                handle,
            )
    else:
        raise ValueError(f"kind ({kind!r}) must be 'fast' or 'sentencepiece'")
    return directory
