"""Build AdaMoE and stock Megatron-Core MoE layers for tests (process groups must exist)."""

from __future__ import annotations

import torch
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_adamoe import AdaMoEConfig, get_adamoe_gpt_layer_spec
from megatron_adamoe.mcore._compat import build_mlp

BASE = dict(
    num_layers=1,
    hidden_size=16,
    num_attention_heads=2,
    num_moe_experts=4,
    moe_ffn_hidden_size=8,
    moe_router_topk=3,
    moe_token_dispatcher_type="alltoall",
    moe_aux_loss_coeff=0.0,
    use_cpu_initialization=True,
    add_bias_linear=False,
    params_dtype=torch.float32,
)


def adamoe_config(**overrides) -> AdaMoEConfig:
    return AdaMoEConfig(**{**BASE, "adamoe_num_null_experts": 4, **overrides})


def stock_config(**overrides) -> TransformerConfig:
    return TransformerConfig(**{**BASE, **overrides})


def build_adamoe_layer(config: AdaMoEConfig, layer_number: int = 1):
    spec = get_adamoe_gpt_layer_spec(num_experts=config.num_moe_experts)
    layer = build_mlp(spec.submodules.mlp, config)
    layer.set_layer_number(layer_number)
    return layer


def build_stock_layer(config: TransformerConfig, layer_number: int = 1):
    spec = get_gpt_layer_local_spec(num_experts=config.num_moe_experts)
    layer = build_mlp(spec.submodules.mlp, config)
    layer.set_layer_number(layer_number)
    return layer
