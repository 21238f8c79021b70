"""Mo-LoRA adapters on disk, beside an unchanged base model: ``mo_lora_config.json`` (the settings
and what the base was) and ``mo_lora_adapters.safetensors`` (routers and LoRA experts only),
written to a temporary name and renamed when complete."""

from __future__ import annotations

import dataclasses
import json
import os

from megatron_adamoe.adapters.mo_lora import MoLoRAConfig, apply_mo_lora, mo_lora_modules
from megatron_adamoe.errors import OptionError

CONFIG_FILE = "mo_lora_config.json"
WEIGHTS_FILE = "mo_lora_adapters.safetensors"
# The base model's settings an adapter depends on.
BASE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers")


def adapter_state_dict(model) -> dict:
    """The routers' and LoRA experts' tensors, by their names in the wrapped model."""
    state = {}
    for name, module in mo_lora_modules(model).items():
        for key, tensor in module.state_dict().items():
            if not key.startswith("base."):
                state[f"{name}.{key}"] = tensor.detach().contiguous().cpu()
    return state


def save_mo_lora(model, directory: str, state_dict: dict | None = None) -> str:
    """Write the adapters of ``model`` to the new directory ``directory``; returns it.
    ``state_dict``: the model's full state when gathered elsewhere (ZeRO-3); its adapter
    tensors are written."""
    from safetensors.torch import save_file

    from megatron_adamoe.storage import atomic_directory

    if os.path.exists(directory):
        raise OptionError(f"directory ({directory!r}) must not exist yet; pick a new path")
    with atomic_directory(directory, "saving Mo-LoRA adapters") as temporary:
        tensors = adapter_state_dict(model)
        if state_dict is not None:
            tensors = {key: state_dict[key].detach().contiguous().cpu() for key in tensors}
        save_file(tensors, os.path.join(temporary, WEIGHTS_FILE))
        with open(os.path.join(temporary, CONFIG_FILE), "w") as handle:
            json.dump(
                {
                    "mo_lora": dataclasses.asdict(model.mo_lora_config),
                    "base": _base_fields(model),
                    "base_name_or_path": getattr(model.config, "_name_or_path", None),
                },
                handle,
                indent=2,
            )
    return directory


def load_mo_lora(base_model, directory: str):
    """Wrap ``base_model`` as the saved adapters were made and load them; returns the model.
    Adapters made for another base are one line naming the setting that differs."""
    from safetensors.torch import load_file

    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise OptionError(
            f"adapters ({directory!r}) must hold {CONFIG_FILE}; save them with save_mo_lora"
        )
    with open(path) as handle:
        saved = json.load(handle)
    here = _base_fields(base_model)
    for field, value in saved["base"].items():
        if here.get(field) != value:
            raise OptionError(
                f"adapters ({directory!r}) must be loaded on the base they were made for: its "
                f"{field} was {value!r}, this model's is {here.get(field)!r} (made on "
                f"{saved.get('base_name_or_path')!r})"
            )
    apply_mo_lora(base_model, MoLoRAConfig(**saved["mo_lora"]))
    tensors = load_file(os.path.join(directory, WEIGHTS_FILE))
    expected = adapter_state_dict(base_model)
    if set(tensors) != set(expected):
        missing, unexpected = (
            sorted(set(expected) - set(tensors)),
            sorted(set(tensors) - set(expected)),
        )
        raise OptionError(
            f"adapters ({directory!r}) must match the base's linears: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}"
        )
    parameters = dict(base_model.named_parameters())
    for key, tensor in tensors.items():
        target = parameters[key]
        if target.shape != tensor.shape:
            raise OptionError(
                f"adapters ({directory!r}) tensor {key} must have shape {tuple(target.shape)}; "
                f"it has {tuple(tensor.shape)}"
            )
        target.data.copy_(tensor.to(target.dtype))
    return base_model


def _base_fields(model) -> dict:
    config = model.config.to_dict() if hasattr(model.config, "to_dict") else dict(model.config)
    return {field: config.get(field) for field in BASE_FIELDS}
