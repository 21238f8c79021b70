"""An AdaMoE gate for DeepSpeed-MoE (``deepspeed.moe.layer.MoE``, deepspeed 0.19).

DeepSpeed's ``MOELayer`` asks its gate for sparse routes: ``gate(input [S, M], used_token,
sparse_routes=True, use_tutel)`` returns ``(l_aux, capacity C, experts E, indices [K, S],
locations [K, S], gates [K, S], exp_counts [E])``, one (expert, slot, weight) triple per token and
route, index -1 for a route that is not sent. ``AdaMoEGate`` scores n true + m null experts, takes
top-k over all of them with ``megatron_adamoe.ops`` (the same routing and weight norms as the
Megatron side), and marks null picks -1: they never take a capacity slot nor an expert call. Its
``l_aux`` is the null-aware loss of paper Eq. 6 (coefficient 1) on this rank's tokens; add
``coeff * l_aux`` to the training loss, as with DeepSpeed's own gates.

What DeepSpeed still ships: MOELayer packs every expert's routes into a fixed [E, C, M] buffer
(C = the largest expert count, all-reduced over the expert-parallel group: dropless) and
all-to-alls the whole buffer, so the rows exchanged are E x C per rank, true routes plus capacity
padding; ``shipped_rows`` counts both. Megatron's AdaMoE dispatcher ships exactly the true routes
(no padding rows). Zero null experts only: MOELayer's combine has no place for an identity term.

Shape legend: T tokens (S in DeepSpeed's names), E true experts, X = E + Z all experts, K picks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from megatron_adamoe.errors import OptionError
from megatron_adamoe.ops.losses import null_aware_load_balancing_loss
from megatron_adamoe.ops.routing import (
    WEIGHT_NORMS,
    null_expert_topk_routing,
    topk_slots_from_routing_map,
)


class AdaMoEGate(torch.nn.Module):
    def __init__(
        self,
        model_dim: int,
        num_experts: int,
        num_null_experts: int,
        k: int,
        weight_norm: str = "true_experts",
        ep_group: Optional[dist.ProcessGroup] = None,
    ) -> None:
        super().__init__()
        if not 1 <= k <= num_experts + num_null_experts:
            raise OptionError(
                f"k ({k}) must be in [1, num_experts + num_null_experts = "
                f"{num_experts + num_null_experts}]; lower it or add null experts"
            )
        if weight_norm not in WEIGHT_NORMS:
            raise OptionError(
                f"weight_norm ({weight_norm!r}) must be one of {WEIGHT_NORMS}; use "
                "'true_experts' (the paper's choice)"
            )
        self.wg = torch.nn.Linear(model_dim, num_experts + num_null_experts, bias=False)
        self.num_experts, self.num_null_experts, self.k = num_experts, num_null_experts, k
        self.weight_norm = weight_norm
        self.ep_group = ep_group
        self.last_routes = None  # (true routes, capacity) of the last forward, for counting

    def _set_ep_group(self, ep_group) -> None:
        """Mirrors TopKGate._set_ep_group (DeepSpeed sets the group when the engine starts)."""
        assert self.ep_group is None, "Attempting to override an existing ep_group"
        self.ep_group = ep_group

    def forward(
        self,
        input: torch.Tensor,
        used_token: Optional[torch.Tensor] = None,
        sparse_routes: bool = True,
        use_tutel: bool = False,
    ):
        """Mirrors TopKGate.forward with ``sparse_routes=True`` and ``drop_tokens=False``."""
        if not sparse_routes or use_tutel or used_token is not None:
            raise OptionError(
                "AdaMoEGate gives sparse routes only (deepspeed >= 0.19's MOELayer, "
                "no Tutel, no used_token mask); use that MOELayer"
            )
        logits_TX = F.linear(input.float(), self.wg.weight.float())
        routing = null_expert_topk_routing(logits_TX, self.k, self.num_experts, self.weight_norm)
        num_tokens = logits_TX.size(0)
        l_aux = null_aware_load_balancing_loss(
            torch.softmax(logits_TX, dim=-1),
            routing.routing_map_TX.sum(dim=0),
            num_tokens,
            self.k,
            self.num_null_experts,
            1.0,
        )
        gates_TK, indices_TK = topk_slots_from_routing_map(
            routing.probs_TE, routing.routing_map_TE, self.k
        )  # -1: a null pick, not sent
        mask_TE = routing.routing_map_TE
        exp_counts_E = mask_TE.sum(dim=0)
        capacity = exp_counts_E.max().clamp(min=1)
        if self.ep_group is not None and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        sent_TK = indices_TK >= 0
        slot_TE = torch.cumsum(mask_TE.long(), dim=0) - 1  # each token's place in its expert
        locations_TK = slot_TE.gather(1, indices_TK.clamp(min=0)) * sent_TK
        self.last_routes = (int(sent_TK.sum()), int(capacity))
        return (
            l_aux,
            capacity,
            self.num_experts,
            _stack(indices_TK, torch.int32),
            _stack(locations_TK, torch.int32),
            _stack(gates_TK.float()),
            exp_counts_E.detach(),
        )

    def shipped_rows(self) -> tuple[int, int]:
        """(true routes, rows DeepSpeed's all-to-all exchanges: E x C) of the last forward."""
        routes, capacity = self.last_routes
        return routes, self.num_experts * capacity


def _stack(routes_TK: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """[T, K] -> the contiguous [K, T] block DeepSpeed's dispatch takes (its _stack_routes)."""
    routes = routes_TK.t().contiguous()
    return routes if dtype is None else routes.to(dtype)


def adamoe_moe(
    hidden_size: int,
    expert: torch.nn.Module,
    num_experts: int,
    num_null_experts: int,
    k: int,
    ep_size: int = 1,
    weight_norm: str = "true_experts",
    **moe_kwargs,
):
    """``deepspeed.moe.layer.MoE`` (dropless) whose gate is an ``AdaMoEGate``. Its forward returns
    DeepSpeed's ``(output, l_aux, exp_counts)``."""
    from deepspeed.moe.layer import MoE

    moe = MoE(
        hidden_size,
        expert,
        num_experts=num_experts,
        ep_size=ep_size,
        k=1,
        drop_tokens=False,
        **moe_kwargs,
    )
    moe.deepspeed_moe.gate = AdaMoEGate(hidden_size, num_experts, num_null_experts, k, weight_norm)
    return moe
