"""Helpers a training loop uses on a model with AdaMoE routers."""

from __future__ import annotations

import torch

from megatron_adamoe.mcore.router import AdaMoERouter


def adamoe_routers(model: torch.nn.Module | list[torch.nn.Module]) -> list[AdaMoERouter]:
    chunks = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in chunks for m in chunk.modules() if isinstance(m, AdaMoERouter)]


def set_adamoe_training_step(model, step: int) -> None:
    """Set the step that drives every router's aux-loss coefficient schedule."""
    if step < 0:
        raise ValueError(f"step ({step}) must be >= 0; pass the 0-based training iteration")
    for router in adamoe_routers(model):
        router.training_step = int(step)


def collect_routing_stats(model) -> dict[int, object]:
    """layer_number -> the RoutingStats of that layer's last forward (local to this rank)."""
    return {
        router.layer_number: router.last_routing_stats
        for router in adamoe_routers(model)
        if router.last_routing_stats is not None
    }
