"""megatron_adamoe: token-adaptive MoE (AdaMoE, null experts) for NVIDIA Megatron-Core.

``megatron_adamoe.ops`` is pure torch. The Megatron-Core pieces below load on first use, so
importing the package (or ops) does not import Megatron-Core.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_MCORE_EXPORTS = (
    "AdaMoEConfig",
    "AdaMoELayer",
    "AdaMoERouter",
    "AdaMoEAlltoAllTokenDispatcher",
    "AdaMoEFlexTokenDispatcher",
    "enable_cpu_mode",
    "finalize_model_grads_with_load_control",
    "disable_cpu_mode",
    "get_adamoe_gpt_layer_spec",
    "get_adamoe_gpt_decoder_block_spec",
    "set_adamoe_training_step",
    "collect_routing_stats",
    "adamoe_metric_names",
)

__all__ = ["__version__", *_MCORE_EXPORTS]


def __getattr__(name: str):
    if name in _MCORE_EXPORTS:
        return getattr(importlib.import_module("megatron_adamoe.mcore"), name)
    raise AttributeError(f"module 'megatron_adamoe' has no attribute {name!r}")
