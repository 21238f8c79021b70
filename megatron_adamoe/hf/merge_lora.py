"""``adamoe-convert merge-lora``: an AdaMoE HF directory and the LoRA / QLoRA adapters that
``adamoe-finetune --method lora|qlora`` trained on it -> one AdaMoE HF directory with the adapters
merged into its linears (and the routers' trained buffers), which loads as exports do and goes
back to Megatron with ``import-hf``. The base is loaded in full precision, also for QLoRA
adapters (merging into 4-bit weights would round the update away)."""

from __future__ import annotations

import logging
import os

import torch

from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.finetune_checks import read_model_config
from megatron_adamoe.hf.import_hf import check_new_output
from megatron_adamoe.storage import atomic_directory

logger = logging.getLogger("megatron_adamoe.convert")


def register_auto_classes(model, tokenizer) -> None:
    """The model's (and the project's own tokenizer's) code goes along with the weights
    (auto_map), so the directory loads as exports do."""
    from megatron_adamoe.hf.tokenization_adamoe import AdaMoETokenizer

    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    if isinstance(tokenizer, AdaMoETokenizer):
        type(tokenizer).register_for_auto_class("AutoTokenizer")


def merge_lora(model_dir: str, adapter_dir: str, out: str, max_shard_size: str = "5GB") -> str:
    """Write ``out``: the model of ``model_dir`` with the adapters of ``adapter_dir`` merged."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import megatron_adamoe.hf  # noqa: F401  (registers the AdaMoE Auto classes)
    from megatron_adamoe.adapters.mo_lora_state import CONFIG_FILE as MO_LORA_CONFIG
    from megatron_adamoe.adapters.peft_lora import load_lora
    from megatron_adamoe.hf.versions import dtype_kwarg

    check_new_output(out, "the merged model")
    if os.path.isfile(os.path.join(adapter_dir, MO_LORA_CONFIG)):
        raise OptionError(
            f"adapter ({adapter_dir!r}) holds Mo-LoRA adapters, which cannot be merged: each "
            "token's update depends on its own routing; load them with adapters.load_mo_lora"
        )
    read_model_config(model_dir)  # an AdaMoE model, one line otherwise
    model = AutoModelForCausalLM.from_pretrained(model_dir, **{dtype_kwarg(): torch.float32})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    merged = load_lora(model, adapter_dir).merge_and_unload()
    with atomic_directory(out, "merging the adapters") as temporary:
        register_auto_classes(merged, tokenizer)
        merged.save_pretrained(temporary, max_shard_size=max_shard_size)
        tokenizer.save_pretrained(temporary)
    logger.info("merged the adapters of %s into %s", adapter_dir, model_dir)
    return out
