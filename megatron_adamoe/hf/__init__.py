"""Hugging Face side of megatron_adamoe: the AdaMoE causal LM for transformers, and conversion.

Importing this package registers the model with transformers' Auto classes (``AutoConfig``,
``AutoModelForCausalLM``, ``AutoTokenizer``), so exported models load without
``trust_remote_code`` once ``megatron_adamoe`` is installed and imported::

    import megatron_adamoe.hf  # noqa: F401  (registers model_type "adamoe")
    model = AutoModelForCausalLM.from_pretrained(exported_dir)

Registration is not patching: it adds the "adamoe" model type and changes nothing else.
The conversion code (``megatron_adamoe.hf.export``, ``megatron_adamoe.hf.import_hf``,
``megatron_adamoe.hf.mixtral_to_adamoe``) and HF fine-tuning (``megatron_adamoe.hf.finetune``)
are imported on use (conversion to Megatron needs Megatron-Core; the model files here do not).
"""

from __future__ import annotations

from megatron_adamoe.hf.configuration_adamoe import AdaMoEHFConfig
from megatron_adamoe.hf.modeling_adamoe import AdaMoEForCausalLM, AdaMoEModel
from megatron_adamoe.hf.tokenization_adamoe import AdaMoETokenizer

__all__ = [
    "AdaMoEForCausalLM",
    "AdaMoEHFConfig",
    "AdaMoEModel",
    "AdaMoETokenizer",
    "register_auto_classes",
]


def register_auto_classes() -> None:
    """Register model_type "adamoe" with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    AutoConfig.register("adamoe", AdaMoEHFConfig, exist_ok=True)
    AutoModel.register(AdaMoEHFConfig, AdaMoEModel, exist_ok=True)
    AutoModelForCausalLM.register(AdaMoEHFConfig, AdaMoEForCausalLM, exist_ok=True)
    AutoTokenizer.register(AdaMoEHFConfig, slow_tokenizer_class=AdaMoETokenizer, exist_ok=True)


register_auto_classes()
