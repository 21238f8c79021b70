"""AdaMoERouter: Megatron-Core's TopKRouter over n true + m null experts."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.moe.moe_utils import (
    apply_random_logits,
    get_tokens_per_expert_and_token_count,
    save_to_aux_losses_tracker,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_adamoe.mcore.config import AdaMoEConfig
from megatron_adamoe.ops.losses import null_aware_load_balancing_loss
from megatron_adamoe.ops.routing import NullExpertRouting, null_expert_topk_routing, routing_stats

LOAD_METRICS = ("adamoe/load", "adamoe/bypass_fraction", "adamoe/null_fraction")


def k_eff_metric_names(topk: int) -> tuple[str, ...]:
    """Tracker names of the k_eff histogram: fraction of tokens using j true experts."""
    return tuple(f"adamoe/k_eff_{j}_fraction" for j in range(topk + 1))


def adamoe_metric_names(config: AdaMoEConfig) -> tuple[str, ...]:
    """The names AdaMoE routers write to Megatron's MoE tracker at every training step under this
    config (``track_moe_metrics(track_names=...)`` reduces and logs only the names it is given)."""
    names = [*LOAD_METRICS, *k_eff_metric_names(config.moe_router_topk)]
    if config.moe_router_load_balancing_type == "aux_loss":
        names.insert(0, "load_balancing_loss")
    if config.moe_z_loss_coeff is not None:
        names.insert(0, "z_loss")
    return tuple(names)


class AdaMoERouter(TopKRouter):
    """Top-k over n true + m null experts; hands the dispatcher the true experts only.

    The gate weight is [n + m, hidden]. ``forward`` returns ``probs`` and ``routing_map`` of shape
    [tokens, n] (a row has 0..k entries), as the Megatron dispatcher contract requires.
    ``forward(..., return_routing=True)`` also returns the identity-null weights. With m = 0 every output equals TopKRouter's
    bit for bit.

    Attributes set by each forward, for logging: ``last_routing_stats`` (ops.RoutingStats).
    ``training_step`` drives the aux-loss coefficient schedule; the training loop sets it
    (``megatron_adamoe.set_adamoe_training_step``).
    """

    def __init__(self, config: AdaMoEConfig, pg_collection=None) -> None:
        """Mirrors TopKRouter.__init__; with m > 0 the gate is re-created over n + m rows."""
        if not isinstance(config, AdaMoEConfig):
            raise TypeError(f"AdaMoERouter needs an AdaMoEConfig, got {type(config).__name__}")
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_null_experts = config.adamoe_num_null_experts
        self.num_experts_with_nulls = config.adamoe_num_experts_with_nulls
        if self.num_null_experts > 0:
            # Router.__init__ sizes the gate by num_moe_experts: re-create it over n + m rows.
            self.weight = torch.nn.Parameter(
                torch.empty((self.num_experts_with_nulls, config.hidden_size), dtype=torch.float32)
            )
            if self.bias is not None:
                self.bias = torch.nn.Parameter(
                    torch.empty((self.num_experts_with_nulls,), dtype=torch.float32)
                )
            self.reset_parameters()
        self.aux_loss_schedule = config.aux_loss_coeff_schedule()
        self.training_step = 0
        self.last_routing_stats = None

    def current_aux_loss_coeff(self) -> float:
        return self.aux_loss_schedule(self.training_step)

    def is_aux_loss_tracked(self) -> bool:
        """The loss is logged at every training step under "aux_loss", also while the schedule's
        coefficient is zero (then it is measured, not applied), so logged names never vary."""
        return self.config.moe_router_load_balancing_type == "aux_loss"

    def forward(
        self,
        input: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
        return_routing: bool = False,
    ):
        """Mirrors TopKRouter.forward: (probs [T, n], routing_map [T, n]).

        ``return_routing=True`` returns the whole :class:`NullExpertRouting` instead (the identity
        weights too); AdaMoELayer asks for it through ``nn.Module.__call__``, so forward hooks on
        the router (DDP's parameter all-gather under ``overlap_param_gather``) still fire.
        """
        input = self.apply_input_jitter(input)
        logits = self.gating(input)
        if self.config.moe_router_force_load_balancing:
            logits = apply_random_logits(logits)
        routing = self._route_logits(logits, padding_mask)
        if return_routing:
            return routing
        return routing.probs_TE, routing.routing_map_TE

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Mirrors TopKRouter.routing over [.., n + m] logits; returns the true-expert slice."""
        routing = self._route_logits(logits, padding_mask)
        return routing.probs_TE, routing.routing_map_TE

    def _route_logits(self, logits, padding_mask) -> NullExpertRouting:
        """TopKRouter.routing with null experts: z-loss, top-k over n + m, null-aware aux loss.

        Upstream's token dropping, sinkhorn, seq/global aux losses and expert bias are rejected
        by AdaMoEConfig, so they have no branch here.
        """
        logits = logits.view(-1, self.num_experts_with_nulls)
        if padding_mask is not None:
            padding_mask = padding_mask.reshape(-1)
        logits = self.apply_z_loss(logits, padding_mask=padding_mask)

        routing = null_expert_topk_routing(
            logits,
            self.topk,
            self.config.num_moe_experts,
            weight_norm=self.config.adamoe_weight_norm,
            scaling_factor=self.config.moe_router_topk_scaling_factor,
        )
        probs = routing.probs_TE
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_tracked():
            probs = self._apply_null_aware_aux_loss(probs, logits, routing, padding_mask)
        self._record_routing_stats(routing, padding_mask)
        return dataclasses.replace(routing, probs_TE=probs)

    def _apply_null_aware_aux_loss(self, probs, logits, routing, padding_mask):
        """Mirrors TopKRouter._apply_aux_loss with paper Eq. 6 in place of the Switch loss.

        The coefficient is the schedule's at ``training_step``; the logged value is unscaled.
        """
        coeff = self.current_aux_loss_coeff()
        scores_TX = torch.softmax(logits, dim=-1, dtype=torch.float32)
        routing_map_TX = routing.routing_map_TX
        if padding_mask is not None:
            valid_T1 = (~padding_mask).unsqueeze(-1)
            scores_TX, routing_map_TX = scores_TX * valid_T1, routing_map_TX * valid_T1
        assignments_X, local_num_tokens, total_num_tokens = get_tokens_per_expert_and_token_count(
            routing_map=routing_map_TX,
            reduce_group=self.tp_cp_group,
            topk=self.topk,
            with_padding_mask=padding_mask is not None,
        )
        if coeff == 0:  # measure for the log only: nothing to attach
            with torch.no_grad():
                unit_loss = null_aware_load_balancing_loss(
                    scores_TX, assignments_X, total_num_tokens, self.topk, self.num_null_experts, 1.0
                )
            save_to_aux_losses_tracker(
                "load_balancing_loss",
                unit_loss,
                self.layer_number,
                self._num_tracked_layers(),
                reduce_group=self.tp_cp_group,
            )
            return probs
        aux_loss = null_aware_load_balancing_loss(
            scores_TX,
            assignments_X,
            total_num_tokens,
            self.topk,
            self.num_null_experts,
            coeff,
        )
        return self.attach_and_log_load_balancing_loss(
            probs,
            coeff,
            aux_loss,
            "load_balancing_loss",
            self.tp_cp_group,
            valid_token_count=local_num_tokens,
        )

    def _record_routing_stats(self, routing: NullExpertRouting, padding_mask) -> None:
        """Keep this forward's statistics; in training also feed Megatron's MoE metrics tracker.

        Tracker values are local sums over this rank's tokens divided by the (valid) tokens of the
        whole tensor/context-parallel group, so the tracker's sum over that group gives the mean
        (the same convention as the load-balancing loss).
        """
        track = self.training and torch.is_grad_enabled() and self.layer_number is not None
        with torch.no_grad():
            valid_T = None if padding_mask is None else ~padding_mask
            stats = routing_stats(routing.routing_map_TE, self.topk, valid_T)
            self.last_routing_stats = stats
            if not track:
                return
            if padding_mask is None:  # every rank of the group holds as many tokens
                group_tokens = stats.num_tokens * self.tp_cp_group.size()
            else:
                group_tokens = reduce_from_tensor_model_parallel_region(
                    stats.num_tokens.clone(), self.tp_cp_group
                )
            group_tokens = group_tokens.clamp(min=1)
            values = {
                "adamoe/load": stats.num_true_assignments / group_tokens,
                "adamoe/bypass_fraction": stats.k_eff_histogram_K1[0] / group_tokens,
                "adamoe/null_fraction": (
                    stats.num_tokens * self.topk - stats.num_true_assignments
                )
                / (group_tokens * self.topk),
            }
            for name, count in zip(k_eff_metric_names(self.topk), stats.k_eff_histogram_K1):
                values[name] = count / group_tokens
            for name, value in values.items():
                save_to_aux_losses_tracker(
                    name,
                    value,
                    self.layer_number,
                    self._num_tracked_layers(),
                    reduce_group=self.tp_cp_group,
                )

    def _num_tracked_layers(self) -> int:
        """Layers in Megatron's tracker arrays (as in TopKRouter.attach_and_log_load_balancing_loss)."""
        return self.config.num_layers + (self.config.mtp_num_layers or 0)
