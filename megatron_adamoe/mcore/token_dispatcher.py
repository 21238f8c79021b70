"""Token dispatchers that ship only true-expert assignments.

The router hands every dispatcher a [tokens, n] routing map over true experts only, so null picks
never enter permutation or communication. What upstream gets wrong with a variable number of picks
per token is the sizing: the dropless all-to-all path assumes exactly k rows per token, and the
DeepEP manager rebuilds k slots per token from ``probs``. The subclasses below size and slot from
the routing map instead.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import (
    MoEAlltoAllTokenDispatcher,
    MoEFlexTokenDispatcher,
    _DeepepManager,
)

from megatron_adamoe.ops.routing import topk_slots_from_routing_map


class AdaMoEAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """All-to-all dispatcher sized exactly from the routing map."""

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        """Mirrors MoEAlltoAllTokenDispatcher.preprocess with the output size taken from the map.

        Upstream's dropless branch sets ``num_out_tokens = tokens * moe_router_topk``; with null
        experts a token has 0..k true picks, so the permutation would be over-allocated (phantom
        rows under the fused permute). As upstream already does under a capacity factor, the size
        is ``routing_map.sum()`` and the host sync moves to before permutation 1.
        """
        num_tokens_per_local_expert = super().preprocess(routing_map)
        self.num_out_tokens = routing_map.sum()
        self._maybe_update_cuda_sync_point("before_permutation_1")
        return num_tokens_per_local_expert


class AdaMoEDeepepManager(_DeepepManager):
    """DeepEP manager whose empty slots come from the routing map."""

    def setup_metadata(self, routing_map: torch.Tensor, probs: torch.Tensor) -> None:
        """Mirrors _DeepepManager.setup_metadata.

        Upstream takes ``topk(probs, k)`` and masks a slot (-1) only under a capacity factor, so a
        token with fewer than k true picks would dispatch zero-probability slots. Here every slot
        the routing map does not select is -1.
        """
        num_tokens = routing_map.shape[0]
        routing_map = routing_map.reshape(num_tokens, self.num_experts)
        probs = probs.reshape(num_tokens, self.num_experts)
        self.token_probs, self.token_indices = topk_slots_from_routing_map(
            probs, routing_map, self.router_topk
        )


class AdaMoEFlexTokenDispatcher(MoEFlexTokenDispatcher):
    """Flex (DeepEP) dispatcher using :class:`AdaMoEDeepepManager`."""

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None):
        """Mirrors MoEFlexTokenDispatcher.__init__, swapping in the null-masking DeepEP manager."""
        super().__init__(num_local_experts, local_expert_indices, config, pg_collection)
        self._comm_manager = AdaMoEDeepepManager(
            group=self.tp_ep_group,
            num_local_experts=self.num_local_experts,
            router_topk=self.tp_size * self.config.moe_router_topk,
            num_experts=self.tp_size * self.config.num_moe_experts,
            config=self.config,
        )


# moe_token_dispatcher_type -> the AdaMoE replacement. The stock all-gather dispatcher stays: it
# already sizes its permutation from the local routing map (``tokens_per_expert.sum()``).
DISPATCHERS = {"alltoall": AdaMoEAlltoAllTokenDispatcher, "flex": AdaMoEFlexTokenDispatcher}
