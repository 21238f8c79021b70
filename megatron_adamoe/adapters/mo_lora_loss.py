"""Mo-LoRA's load-balancing loss as the AdaMoE authors compute it, and its routing statistics.

Per decoder layer, the router logits of all that layer's Mo-LoRA linears are concatenated over
tokens and given the null-aware loss of paper Eq. 6 (``megatron_adamoe.ops``); the layers' losses
are summed and weighed by ``aux_loss_coef``. Statistics per layer: the load (true picks per token
per linear) and the k_eff histogram.

Legend: T tokens (all the layer's linears' rows), X = E + null experts, K top-k.
"""

from __future__ import annotations

import re

import torch

from megatron_adamoe.adapters.mo_lora import MoLoRALinear, mo_lora_modules
from megatron_adamoe.ops.losses import null_aware_load_balancing_loss
from megatron_adamoe.ops.routing import null_expert_topk_routing

_LAYER = re.compile(r"^(.*?\.\d+)\.")


def logits_by_layer(model) -> dict[str, torch.Tensor]:
    """{decoder layer (``model.layers.3``): its Mo-LoRA linears' last router logits, [T, X]
    concatenated}, in model order."""
    layers: dict[str, list] = {}
    for name, module in mo_lora_modules(model).items():
        if module.last_router_logits is None:
            continue
        match = _LAYER.match(name)
        layers.setdefault(match.group(1) if match else name, []).append(module.last_router_logits)
    return {layer: torch.cat(parts, dim=0) for layer, parts in layers.items()}


def layer_routings(model) -> dict[str, tuple]:
    """{decoder layer: (its concatenated router logits [T, X], their routing)} of the last
    forward: routed once, for the aux loss and the statistics alike."""
    config = model.mo_lora_config
    return {
        layer: (
            logits_TX,
            null_expert_topk_routing(
                logits_TX, config.topk, config.num_experts, weight_norm=config.weight_norm
            ),
        )
        for layer, logits_TX in logits_by_layer(model).items()
    }


def mo_lora_aux_loss(model, routings: dict | None = None) -> torch.Tensor:
    """aux_loss_coef x the sum over decoder layers of Eq. 6 on the layer's concatenated router
    logits (of the last forward). ``routings``: ``layer_routings(model)`` when already taken."""
    config = model.mo_lora_config
    total = torch.zeros((), dtype=torch.float32)
    for logits_TX, routing in (routings or layer_routings(model)).values():
        total = total.to(logits_TX.device) + layer_loss(logits_TX, routing, config)
    return total * config.aux_loss_coef


def layer_loss(logits_TX: torch.Tensor, routing, config) -> torch.Tensor:
    """Eq. 6 (coefficient 1) of one layer's routing."""
    return null_aware_load_balancing_loss(
        torch.softmax(logits_TX, dim=-1, dtype=torch.float32),
        routing.routing_map_TX.sum(0),
        logits_TX.size(0),
        config.topk,
        config.num_null_experts,
        1.0,
    )


def empty_experts(model) -> int:
    """(linear, LoRA expert) pairs that computed no row in the last forward."""
    return sum(
        int((m.last_expert_rows_E == 0).sum())
        for m in mo_lora_modules(model).values()
        if m.last_expert_rows_E is not None
    )


def routing_statistics(model, routings: dict | None = None) -> dict[str, dict]:
    """{decoder layer: {"load": true picks per token and linear, "k_eff": fraction of tokens
    with 0..k true picks}} of the last forward (``routings`` as for ``mo_lora_aux_loss``)."""
    config = model.mo_lora_config
    statistics = {}
    with torch.no_grad():
        for layer, (_, routing) in (routings or layer_routings(model)).items():
            picks_T = routing.routing_map_TE.sum(1)
            histogram = torch.bincount(picks_T, minlength=config.topk + 1).float()
            statistics[layer] = {
                "load": float(picks_T.float().mean()),
                "k_eff": (histogram / max(1, picks_T.numel())).tolist(),
            }
    return statistics


__all__ = [
    "MoLoRALinear",
    "empty_experts",
    "layer_routings",
    "logits_by_layer",
    "mo_lora_aux_loss",
    "routing_statistics",
]
