"""Pure torch math for AdaMoE: routing, the null-aware loss, statistics.

Nothing here imports Megatron-Core or torch.distributed.
"""

from megatron_adamoe.ops.losses import null_aware_assignment_counts, null_aware_load_balancing_loss
from megatron_adamoe.ops.routing import (
    WEIGHT_NORMS,
    NullExpertRouting,
    RoutingStats,
    expected_load,
    null_expert_topk_routing,
    routing_stats,
    topk_slots_from_routing_map,
)

__all__ = [
    "WEIGHT_NORMS",
    "NullExpertRouting",
    "RoutingStats",
    "expected_load",
    "null_aware_assignment_counts",
    "null_aware_load_balancing_loss",
    "null_expert_topk_routing",
    "routing_stats",
    "topk_slots_from_routing_map",
]
