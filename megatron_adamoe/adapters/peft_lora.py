"""LoRA and QLoRA on AdaMoE MoE models through PEFT (paper section 4.2, Table 1): adapters on the
router (all n + m rows) and the experts' w1, w2, w3, optionally attention; the base in 4 bits
through bitsandbytes for QLoRA. The routers' persistent buffers (the controller's null bias, the
expert bias) move during fine-tuning, so they are saved with the adapters and loaded with them.

    model = apply_lora(model, lora_settings(rank=8, alpha=16, dropout=0.05))
    ... train ...
    save_lora(model, "out/adapters")  # adapter_config.json, adapter_model.safetensors and
                                      # router_buffers.safetensors
    model = load_lora(AutoModelForCausalLM.from_pretrained(base), "out/adapters")
    merged = model.merge_and_unload()                 # plain linears again: an AdaMoE model

PEFT and bitsandbytes are imported on use (the ``finetune`` extra)."""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

from megatron_adamoe.errors import OptionError

# The paper's targets on an AdaMoE (Mixtral-named) model: the router, whose LoRA covers all n + m
# rows (the paper's gate and gate2), and each expert's three projections.
MOE_TARGETS = ("gate", "w1", "w2", "w3")
ROUTER_BUFFERS_FILE = "router_buffers.safetensors"


def lora_settings(rank: int, alpha: float, dropout: float, targets: Sequence[str] = MOE_TARGETS):
    """PEFT's LoraConfig, the settings checked first (one line each)."""
    if rank < 1:
        raise OptionError(f"lora_rank ({rank}) must be >= 1; pass a positive --lora-rank")
    if alpha <= 0:
        raise OptionError(f"lora_alpha ({alpha}) must be > 0; pass a positive --lora-alpha")
    if not 0.0 <= dropout < 1.0:
        raise OptionError(f"lora_dropout ({dropout}) must be in [0, 1); e.g. --lora-dropout 0.05")
    if not targets:
        raise OptionError("lora_target_modules must name at least one linear, e.g. gate w1 w2 w3")
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        task_type="CAUSAL_LM",
    )


def check_targets(model: nn.Module, targets: Sequence[str]) -> None:
    """Every target names at least one linear layer of ``model`` (by the last part of its name,
    as PEFT matches), else one line listing the model's linear names."""
    linear_names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and name
        }
    )
    for target in targets:
        if target not in linear_names:
            raise OptionError(
                f"lora_target_modules ({target!r}) names no linear layer of the model; its "
                f"linears are: {', '.join(linear_names)}"
            )


def quantization_config(compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for QLoRA's base (NF4, double quantization); one line
    when bitsandbytes is missing or cannot run 4-bit on this device."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise OptionError(
            f"method qlora needs bitsandbytes ({error}); install the finetune extra "
            "(pip install 'megatron-adamoe[finetune]') or use --method lora"
        ) from None
    if not _runs_4bit(compute_dtype):
        raise OptionError(
            "method qlora needs bitsandbytes' 4-bit kernels on this device, which fail here "
            f"(bitsandbytes {bitsandbytes.__version__}); use --method lora"
        )
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _runs_4bit(compute_dtype: torch.dtype) -> bool:
    """One small NF4 layer, forward and backward, on the device the run uses."""
    import bitsandbytes as bnb

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=compute_dtype)
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device, dtype=compute_dtype, requires_grad=True)
        layer(x).sum().backward()
        return bool(torch.isfinite(x.grad).all())
    except (RuntimeError, NotImplementedError, AttributeError, ValueError):
        return False


def apply_lora(model: nn.Module, settings, quantized: bool = False):
    """``model`` wrapped by PEFT with ``settings`` (lora_settings): only the adapters train.
    A 4-bit base is first prepared as PEFT prepares it (norms in fp32, input gradients)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    check_targets(model, settings.target_modules)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, settings)


def router_buffers(model: nn.Module) -> dict:
    """The base model's persistent buffers, by their name in the base model (AdaMoE: each
    router's null bias and expert bias)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    non_persistent = {
        f"{name}.{buffer}" if name else buffer
        for name, module in base.named_modules()
        for buffer in module._non_persistent_buffers_set
    }
    return {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in base.named_buffers()
        if name not in non_persistent
    }


def save_lora(model, directory: str, state_dict: Optional[dict] = None) -> None:
    """PEFT's adapter files (``state_dict``: gathered under ZeRO-3) and the routers' buffers."""
    from safetensors.torch import save_file

    model.save_pretrained(directory, state_dict=state_dict)
    save_file(router_buffers(model), os.path.join(directory, ROUTER_BUFFERS_FILE))


def load_lora(model: nn.Module, directory: str):
    """``model`` (the base, unchanged) with the adapters of ``directory`` and its routers'
    buffers; adapters made for another base are one line naming the first tensor that differs."""
    from peft import PeftModel
    from safetensors.torch import load_file

    if not os.path.isfile(os.path.join(directory, "adapter_config.json")):
        raise OptionError(
            f"adapter ({directory!r}) must be a directory of PEFT adapters (adapter_config.json); "
            "adamoe-finetune --method lora|qlora writes one"
        )
    buffers = load_file(os.path.join(directory, ROUTER_BUFFERS_FILE))
    own = dict(model.named_buffers())
    for name, tensor in buffers.items():
        if name not in own or own[name].shape != tensor.shape:
            raise OptionError(
                f"adapter ({directory!r}) was made for another base: its buffer {name} "
                f"{tuple(tensor.shape)} is {tuple(own[name].shape) if name in own else 'absent'} "
                "in this model; load it on the model it was trained from"
            )
    try:
        wrapped = PeftModel.from_pretrained(model, directory)
    except RuntimeError as error:  # PEFT's size mismatch, the first one as one line
        first = next(
            (line.strip() for line in str(error).splitlines() if "size mismatch" in line),
            " ".join(str(error).split())[:300],
        )
        raise OptionError(
            f"adapter ({directory!r}) was made for another base: {first}; load it on the model "
            "it was trained from"
        ) from None
    with torch.no_grad():
        for name, tensor in buffers.items():
            own[name].copy_(tensor)
    return wrapped
