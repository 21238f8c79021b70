"""AdaMoELayer: Megatron-Core's MoELayer with the AdaMoE router, dispatcher and identity nulls."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

from megatron_adamoe.mcore.config import AdaMoEConfig
from megatron_adamoe.mcore.router import AdaMoERouter
from megatron_adamoe.mcore.token_dispatcher import DISPATCHERS


class AdaMoELayer(MoELayer):
    """MoELayer whose token dispatcher ships true-expert assignments only.

    The router must be an :class:`AdaMoERouter` (``MoESubmodules.router``). Identity null experts
    add ``identity_weight * x`` to the routed output locally, with no communication.

    Note: megatron-core 0.16's TransformerLayer passes ``pg_collection`` only to modules that *are*
    MoELayer, so inside its TransformerLayer this layer uses the process groups of
    ``parallel_state``; from 0.17 every MLP builder gets the layer's ``pg_collection``.
    """

    def __init__(
        self,
        config: AdaMoEConfig,
        submodules: Optional[MoESubmodules] = None,
        layer_number: Optional[int] = None,
        pg_collection=None,
        **upstream_kwargs,
    ):
        """Mirrors MoELayer.__init__, then replaces the stock token dispatcher.
        ``upstream_kwargs``: what newer megatron-core passes on (0.17+: ``is_mtp_layer``,
        ``name``).

        MoELayer picks its dispatcher class from ``moe_token_dispatcher_type`` with no hook, so the
        stock one is built and then swapped for the AdaMoE subclass of the same type (all-to-all,
        flex); the stock all-gather dispatcher is kept as it is.
        """
        if not isinstance(config, AdaMoEConfig):
            raise TypeError(f"AdaMoELayer needs an AdaMoEConfig, got {type(config).__name__}")
        if submodules is None or not issubclass(_router_class(submodules.router), AdaMoERouter):
            raise TypeError("AdaMoELayer needs MoESubmodules(router=AdaMoERouter, ...)")
        if pg_collection is None:
            pg_collection = get_default_pg_collection()
        super().__init__(config, submodules, layer_number, pg_collection, **upstream_kwargs)
        dispatcher_class = DISPATCHERS.get(config.moe_token_dispatcher_type)
        if dispatcher_class is not None:
            self.token_dispatcher = dispatcher_class(
                self.num_local_experts,
                self.local_expert_indices,
                config=self.config,
                pg_collection=pg_collection,
            )
            if self.use_shared_expert and self.shared_expert_overlap:
                self.token_dispatcher.set_shared_experts(self.shared_experts)
        self._identity_input = None

    def route(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Mirrors MoELayer.route; keeps the identity-null weights and input for ``postprocess``.

        The router is called through ``nn.Module.__call__`` as upstream does, so its forward hooks
        fire (Megatron DDP waits for a module's parameter all-gather in a forward pre-hook under
        ``overlap_param_gather``). Route and postprocess both run inside upstream's
        ``custom_forward``, so under MoE recompute the recomputed pass stores tensors that carry
        gradient.
        """
        routing = self.router(hidden_states, padding_mask, return_routing=True)
        if self.config.adamoe_null_expert_type == "identity":
            self._identity_input = (routing.identity_weight_T, hidden_states)
        return routing.probs_TE, routing.routing_map_TE

    def postprocess(self, output: torch.Tensor, shared_expert_output: Optional[torch.Tensor]):
        """Mirrors MoELayer.postprocess, adding the identity-null term ``s * x``."""
        output = super().postprocess(output, shared_expert_output)
        if self._identity_input is not None:
            identity_weight_T, hidden_states = self._identity_input
            self._identity_input = None
            identity_weight = identity_weight_T.view(*hidden_states.shape[:-1], 1)
            output = output + (identity_weight * hidden_states).to(output.dtype)
        return output


def _router_class(router_builder) -> type:
    return router_builder if isinstance(router_builder, type) else type(router_builder)
