"""The only package that touches Megatron-Core internals (supported versions: _compat)."""

from megatron_adamoe.mcore._compat import MEGATRON_CORE_VERSION
from megatron_adamoe.mcore.config import AdaMoEConfig
from megatron_adamoe.mcore.cpu import disable_cpu_mode, enable_cpu_mode
from megatron_adamoe.mcore.layer_specs import (
    get_adamoe_gpt_decoder_block_spec,
    get_adamoe_gpt_layer_spec,
)
from megatron_adamoe.mcore.load_control import (
    finalize_model_grads_with_load_control,
    update_null_biases,
)
from megatron_adamoe.mcore.moe_layer import AdaMoELayer
from megatron_adamoe.mcore.router import AdaMoERouter, adamoe_metric_names
from megatron_adamoe.mcore.token_dispatcher import (
    AdaMoEAlltoAllTokenDispatcher,
    AdaMoEFlexTokenDispatcher,
)
from megatron_adamoe.mcore.training_state import collect_routing_stats, set_adamoe_training_step

__all__ = [
    "MEGATRON_CORE_VERSION",
    "AdaMoEAlltoAllTokenDispatcher",
    "AdaMoEConfig",
    "AdaMoEFlexTokenDispatcher",
    "AdaMoELayer",
    "AdaMoERouter",
    "adamoe_metric_names",
    "collect_routing_stats",
    "disable_cpu_mode",
    "enable_cpu_mode",
    "finalize_model_grads_with_load_control",
    "get_adamoe_gpt_decoder_block_spec",
    "get_adamoe_gpt_layer_spec",
    "set_adamoe_training_step",
    "update_null_biases",
]
