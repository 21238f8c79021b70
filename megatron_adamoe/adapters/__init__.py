"""Adapters for fine-tuning Hugging Face models the AdaMoE way: Mo-LoRA on dense models
(``mo_lora``). Pure torch and transformers; no Megatron."""

from megatron_adamoe.adapters.mo_lora import (
    DEFAULT_TARGETS,
    MoLoRAConfig,
    MoLoRALinear,
    apply_mo_lora,
    mo_lora_modules,
)
from megatron_adamoe.adapters.mo_lora_loss import mo_lora_aux_loss, routing_statistics
from megatron_adamoe.adapters.mo_lora_state import load_mo_lora, save_mo_lora

__all__ = [
    "DEFAULT_TARGETS",
    "MoLoRAConfig",
    "MoLoRALinear",
    "apply_mo_lora",
    "load_mo_lora",
    "mo_lora_aux_loss",
    "mo_lora_modules",
    "routing_statistics",
    "save_mo_lora",
]
