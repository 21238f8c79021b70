"""AdaMoERouter: Megatron-Core's TopKRouter over n true + m null experts."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.moe.moe_utils import (
    apply_random_logits,
    get_tokens_per_expert_and_token_count,
)
from megatron.core.transformer.moe.router import TopKRouter

from megatron_adamoe.mcore._compat import PROBS_CAST_AFTER_SCALING, record_moe_metric
from megatron_adamoe.mcore.config import AdaMoEConfig
from megatron_adamoe.ops.load_control import probe_offsets_P, true_picks_at_offsets
from megatron_adamoe.ops.losses import null_aware_load_balancing_loss
from megatron_adamoe.ops.routing import NullExpertRouting, null_expert_topk_routing, routing_stats

LOAD_METRICS = ("adamoe/load", "adamoe/bypass_fraction", "adamoe/null_fraction")
NULL_BIAS_METRIC = "adamoe/null_bias"


def k_eff_metric_names(topk: int) -> tuple[str, ...]:
    """Tracker names of the k_eff histogram: fraction of tokens using j true experts."""
    return tuple(f"adamoe/k_eff_{j}_fraction" for j in range(topk + 1))


def adamoe_metric_names(config: AdaMoEConfig) -> tuple[str, ...]:
    """The names AdaMoE routers write to Megatron's MoE tracker at every training step under this
    config (``track_moe_metrics(track_names=...)`` reduces and logs only the names it is given)."""
    names = [*LOAD_METRICS, *k_eff_metric_names(config.moe_router_topk)]
    if config.adamoe_load_controlled:
        names.append(NULL_BIAS_METRIC)
    if config.moe_router_load_balancing_type == "aux_loss":
        names.insert(0, "load_balancing_loss")
    if config.moe_z_loss_coeff is not None:
        names.insert(0, "z_loss")
    return tuple(names)


class AdaMoERouter(TopKRouter):
    """Top-k over n true + m null experts; hands the dispatcher the true experts only.

    The gate weight is [n + m, hidden]. ``forward`` returns ``probs`` and ``routing_map`` of shape
    [tokens, n] (a row has 0..k entries), as the Megatron dispatcher contract requires.
    ``forward(..., return_routing=True)`` also returns the identity-null weights. With m = 0 every
    output equals TopKRouter's
    bit for bit.

    Attributes set by each forward, for logging: ``last_routing_stats`` (ops.RoutingStats).
    ``training_step`` drives the aux-loss coefficient schedule; the training loop sets it
    (``megatron_adamoe.set_adamoe_training_step``).
    """

    def __init__(self, config: AdaMoEConfig, pg_collection=None, **upstream_kwargs) -> None:
        """Mirrors TopKRouter.__init__; with m > 0 the gate is re-created over n + m rows.
        ``upstream_kwargs``: what newer megatron-core passes on (0.17+: ``is_mtp_layer``)."""
        if not isinstance(config, AdaMoEConfig):
            raise TypeError(f"AdaMoERouter needs an AdaMoEConfig, got {type(config).__name__}")
        super().__init__(config=config, pg_collection=pg_collection, **upstream_kwargs)
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
        self.load_controlled = config.adamoe_load_controlled
        if self.load_controlled:
            # The null experts' selection bias (model state: saved, exported) and this rank's
            # [true assignments, tokens] since the last update (megatron_adamoe.mcore.load_control).
            self.register_buffer(
                "null_bias", torch.zeros(1, dtype=torch.float32, device=self.weight.device)
            )
            # [true picks at each probe offset of the null bias, tokens]: one offset (0, the
            # routing as it is) under a fixed controller rate, the probe ladder otherwise.
            self.register_buffer(
                "load_probe_offsets",
                torch.zeros(1, device=self.weight.device)
                if config.adamoe_load_controller_rate is not None
                else probe_offsets_P(self.weight.device),
                persistent=False,
            )
            self.register_buffer(
                "local_load_counts",
                torch.zeros(
                    self.load_probe_offsets.numel() + 1,
                    dtype=torch.float32,
                    device=self.weight.device,
                ),
                persistent=False,
            )

    def current_aux_loss_coeff(self) -> float:
        return self.aux_loss_schedule(self.training_step)

    def current_target_load(self) -> Optional[float]:
        """The load controller's target at ``training_step`` (None without a controller)."""
        if not self.load_controlled:
            return None
        return self.config.target_load_schedule(self.layer_number or 1)(self.training_step)

    def selection_bias(self) -> Optional[torch.Tensor]:
        """[n + m] bias added to the logits to choose experts (never to their weights): the
        aux-loss-free expert bias on the true experts, the controller's null bias on the nulls."""
        if not self.load_controlled and self.expert_bias is None:
            return None
        true_E = (
            self.expert_bias
            if self.expert_bias is not None
            else torch.zeros(self.config.num_moe_experts, device=self.weight.device)
        )
        if not self.num_null_experts:
            return true_E
        null_Z = (
            self.null_bias if self.load_controlled else torch.zeros(1, device=self.weight.device)
        ).expand(self.num_null_experts)
        return torch.cat([true_E.float(), null_Z.float()])

    def _maintain_float32_expert_bias(self):
        """Mirrors TopKRouter._maintain_float32_expert_bias for the null bias and the load
        counts too (Float16Module would otherwise keep them in bf16)."""
        super()._maintain_float32_expert_bias()
        if self.load_controlled:  # and the controller's counts, exact in float32 (not bf16)
            for name in ("null_bias", "local_load_counts", "load_probe_offsets"):
                buffer = getattr(self, name)
                if buffer.dtype != torch.float32:
                    buffer.data = buffer.data.to(torch.float32)

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
        self._maintain_float32_expert_bias()
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
        """TopKRouter.routing with null experts: z-loss, top-k (or top-p) over n + m with the
        selection bias, the null-aware aux loss, expert-bias and load counts.

        Upstream's token dropping, sinkhorn and seq/global aux losses are rejected by AdaMoEConfig,
        so they have no branch here. Sigmoid scores (m = 0 only) take upstream's path as it is.
        """
        if self.score_function == "sigmoid":
            return self._stock_routing(logits, padding_mask)
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
            selection_bias_X=self.selection_bias(),
            topp_threshold=self.config.adamoe_topp_threshold,
            cast_after_scaling=PROBS_CAST_AFTER_SCALING,
        )
        probs = routing.probs_TE
        if self.training and torch.is_grad_enabled() and self.is_aux_loss_tracked():
            probs = self._apply_null_aware_aux_loss(probs, logits, routing, padding_mask)
        self._apply_expert_bias(routing.routing_map_TE, padding_mask=padding_mask)
        self._count_load(logits, padding_mask)
        self._record_routing_stats(routing, padding_mask)
        return dataclasses.replace(routing, probs_TE=probs)

    def _stock_routing(self, logits, padding_mask) -> NullExpertRouting:
        """TopKRouter.routing unchanged (sigmoid scores, no null experts), as a routing result."""
        probs_TE, routing_map_TE = super().routing(logits, padding_mask)
        routing = NullExpertRouting(
            probs_TE,
            routing_map_TE,
            routing_map_TE,
            torch.zeros(probs_TE.size(0), device=probs_TE.device),
        )
        self._record_routing_stats(
            routing, None if padding_mask is None else padding_mask.reshape(-1)
        )
        return routing

    def _count_load(self, logits_TX: torch.Tensor, padding_mask) -> None:
        """Accumulate this rank's [true picks at each probe offset of the null bias, tokens] for
        the controller (training only, as upstream counts tokens per expert for the expert
        bias); offset 0 is the routing this pass made."""
        if not self.load_controlled or not torch.is_grad_enabled():
            return
        with torch.no_grad():
            if padding_mask is not None:
                logits_TX = logits_TX[~padding_mask]
            picks_P = true_picks_at_offsets(
                logits_TX,
                self.topk,
                self.config.num_moe_experts,
                self.load_probe_offsets,
                self.selection_bias(),
                self.config.adamoe_topp_threshold,
            )
            tokens = torch.tensor([float(logits_TX.size(0))], device=logits_TX.device)
            self.local_load_counts += torch.cat([picks_P, tokens])

    def _apply_null_aware_aux_loss(self, probs, logits, routing, padding_mask):
        """Mirrors TopKRouter._apply_aux_loss with paper Eq. 6 in place of the Switch loss.

        The coefficient is the schedule's at ``training_step``; the logged value is unscaled.
        """
        coeff = self.current_aux_loss_coeff()
        target_load = self.current_target_load()  # the loss takes the controller's null share
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
                    scores_TX,
                    assignments_X,
                    total_num_tokens,
                    self.topk,
                    self.num_null_experts,
                    1.0,
                    target_load,
                )
            record_moe_metric(
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
            target_load,
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
                "adamoe/null_fraction": (stats.num_tokens * self.topk - stats.num_true_assignments)
                / (group_tokens * self.topk),
            }
            for name, count in zip(k_eff_metric_names(self.topk), stats.k_eff_histogram_K1):
                values[name] = count / group_tokens
            if self.load_controlled:  # the same on every rank: its share of the group's sum
                values[NULL_BIAS_METRIC] = self.null_bias[0] / self.tp_cp_group.size()
            for name, value in values.items():
                record_moe_metric(
                    name,
                    value,
                    self.layer_number,
                    self._num_tracked_layers(),
                    reduce_group=self.tp_cp_group,
                )

    def _num_tracked_layers(self) -> int:
        """Layers in Megatron's tracker arrays (as in
        TopKRouter.attach_and_log_load_balancing_loss)."""
        return self.config.num_layers + (self.config.mtp_num_layers or 0)
