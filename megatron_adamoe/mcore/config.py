"""AdaMoEConfig: Megatron-Core's TransformerConfig plus the AdaMoE fields, validated together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_adamoe.errors import OptionError
from megatron_adamoe.mcore import _compat  # noqa: F401  (fails early on an unsupported version)
from megatron_adamoe.ops.routing import expected_load
from megatron_adamoe.options.rules import check_adamoe
from megatron_adamoe.options.schedule import StepSchedule
from megatron_adamoe.options.vocab import moe_layer_indices


@dataclass
class AdaMoEConfig(TransformerConfig):
    """TransformerConfig for models with AdaMoE layers.

    ``num_moe_experts`` counts the true experts (n) and ``moe_router_topk`` is k over all n + m
    experts. With ``adamoe_num_null_experts=0`` the layer is plain top-k.
    """

    adamoe_num_null_experts: int = 0
    """m, the number of null experts (zero FLOPs). 0 gives stock top-k routing."""

    adamoe_null_expert_type: str = "zero"
    """"zero": a null pick adds nothing (paper default). "identity": null picks add weight * x
    (see megatron_adamoe.ops.routing for how that weight is normalised)."""

    adamoe_weight_norm: str = "true_experts"
    """How the selected experts' weights are normalised: "true_experts" (paper's choice),
    "all_selected" or "none"."""

    adamoe_aux_loss_coeff_schedule: Optional[str] = None
    """Coefficient of the null-aware load-balancing loss over training steps, e.g.
    "piecewise:0.1,1000:0.01" (see megatron_adamoe.options.schedule). None: a constant
    ``moe_aux_loss_coeff``."""

    adamoe_target_load: Optional[Union[float, list]] = None
    """Target load (true experts per token): a number, or one per MoE layer. A per-layer null
    logit bias, added for expert selection only, is moved after every global batch to where
    that batch's load would have met the target (``mcore.load_control``); the load-balancing loss
    takes the target's null share (megatron_adamoe.ops.losses). None: no controller (unless
    expert bias is on, which then holds the balanced load k n / (n + m))."""

    adamoe_target_load_schedule: Optional[str] = None
    """The target load over training steps (the schedule grammar of
    ``adamoe_aux_loss_coeff_schedule``), e.g. "linear:1.5,1.0,500"; instead of a constant."""

    adamoe_load_controller_rate: Optional[float] = None
    """None: the null bias solves for each batch's target (no rate to choose). A number (an
    expert override): the bias moves by rate x (measured load - target) per global batch."""

    adamoe_router_mode: str = "topk"
    """"topk": every token takes k experts over n + m. "topp": the smallest set whose probability
    mass reaches ``adamoe_topp_threshold``, at most k (paper appendix C)."""

    adamoe_topp_threshold: Optional[float] = None
    """p of top-p routing, in (0, 1]."""

    def __post_init__(self) -> None:
        self._validate_adamoe()
        # Upstream allows expert bias with sigmoid scores only; AdaMoE adds it to the softmax
        # logits (selection only), so step around that one check and restore the field.
        softmax_expert_bias = (
            self.moe_router_enable_expert_bias and self.moe_router_score_function == "softmax"
        )
        if softmax_expert_bias:
            self.moe_router_enable_expert_bias = False
        try:
            super().__post_init__()
        finally:
            if softmax_expert_bias:
                self.moe_router_enable_expert_bias = True

    @property
    def adamoe_num_experts_with_nulls(self) -> int:
        return self.num_moe_experts + self.adamoe_num_null_experts

    @property
    def adamoe_load_controlled(self) -> bool:
        """Whether a null bias steers the load (a target, or expert bias with null experts)."""
        return self.adamoe_num_null_experts > 0 and (
            self.adamoe_target_load is not None
            or self.adamoe_target_load_schedule is not None
            or self.moe_router_enable_expert_bias
        )

    def is_dense_model(self) -> bool:
        """Megatron's dense GPT (the options' ``num_experts: 0``): no experts, no expert width
        and no nulls; a config with only some of these is a broken MoE config, checked as one."""
        return (
            self.num_moe_experts is None
            and self.moe_ffn_hidden_size is None
            and not self.adamoe_num_null_experts
        )

    def adamoe_moe_layer_numbers(self) -> list[int]:
        """1-based numbers of the MoE layers under ``moe_layer_freq`` (Megatron's rule); none in
        a dense model."""
        if not self.num_moe_experts:
            return []
        return [i + 1 for i in moe_layer_indices(self.num_layers, self.moe_layer_freq)]

    def target_load_schedule(self, layer_number: int) -> Optional[StepSchedule]:
        """The target load of MoE layer ``layer_number`` over steps; None without a controller."""
        if not self.adamoe_load_controlled:
            return None
        if self.adamoe_target_load_schedule is not None:
            return StepSchedule.parse(
                self.adamoe_target_load_schedule, "adamoe_target_load_schedule"
            )
        target = self.adamoe_target_load
        if target is None:  # expert bias alone: hold the balanced load
            target = expected_load(
                self.moe_router_topk, self.num_moe_experts, self.adamoe_num_null_experts
            )
        if isinstance(target, list):
            target = target[self.adamoe_moe_layer_numbers().index(layer_number)]
        return StepSchedule.constant(float(target))

    def aux_loss_coeff_schedule(self) -> StepSchedule:
        """The coefficient schedule of the null-aware load-balancing loss (zero when disabled)."""
        if self.moe_router_load_balancing_type == "none":
            return StepSchedule.constant(0.0)
        if self.adamoe_aux_loss_coeff_schedule is not None:
            return StepSchedule.parse(self.adamoe_aux_loss_coeff_schedule)
        return StepSchedule.constant(self.moe_aux_loss_coeff)

    def _validate_adamoe(self) -> None:
        """The AdaMoE rules of a Megatron run (``options.rules.check_adamoe``, which the
        pretraining options call too), then the Megatron settings AdaMoE cannot serve."""
        if self.is_dense_model():  # no router: nothing of AdaMoE's to check
            return
        check_adamoe(self, "megatron", len(self.adamoe_moe_layer_numbers()))
        if self.moe_router_pre_softmax and self.adamoe_weight_norm != "none":
            raise OptionError(
                f"moe_router_pre_softmax ({self.moe_router_pre_softmax!r}) must be False unless "
                "adamoe_weight_norm is 'none'; adamoe_weight_norm chooses the normalisation; "
                "'none' is the pre-softmax behaviour"
            )
        self._reject_unsupported_router_options()

    def _reject_unsupported_router_options(self) -> None:
        pad_rows = (
            "it ships pad rows over the all-to-all; the FP8 grouped GEMM pads each expert's "
            "chunk locally instead"
        )
        no_graphs = (
            "per-token expert counts vary, so dispatch sizes cannot be captured in a CUDA graph"
        )
        no_groups = "group-limited routing is not defined over null experts"
        # Checked before upstream's __post_init__, which rewrites the deprecated aliases
        # (enable_cuda_graph, moe_router_topk_limited_devices, ...) into other fields.
        unsupported = [
            # (field, value that is fine, rule, why / fix)
            (
                "moe_expert_capacity_factor",
                None,
                "be None",
                "AdaMoE is dropless: capacity padding "
                "would ship pad rows over the all-to-all; leave it unset",
            ),
            (
                "moe_pad_expert_input_to_capacity",
                False,
                "be False",
                "AdaMoE is dropless: padding to "
                "capacity ships pad rows over the all-to-all; leave it False",
            ),
            (  # megatron-core 0.19 on
                "moe_expert_rank_capacity_factor",
                None,
                "be None",
                "AdaMoE is dropless: a per-rank capacity drops tokens; leave it unset",
            ),
            ("moe_router_padding_for_quantization", False, "be False", pad_rows),
            ("moe_router_padding_for_fp8", False, "be False", pad_rows),
            ("moe_router_num_groups", None, "be None", no_groups),
            ("moe_router_group_topk", None, "be None", no_groups),
            (
                "moe_router_topk_limited_devices",
                None,
                "be None",
                "device-limited (group) routing is not defined over null experts",
            ),
            (
                "moe_router_fusion",
                False,
                "be False",
                "the fused top-k kernel knows no null experts",
            ),
            (
                "moe_enable_routing_replay",
                False,
                "be False",
                "routing replay records stock top-k indices, not null-expert picks",
            ),
            ("cuda_graph_impl", "none", "be 'none'", no_graphs),
            ("enable_cuda_graph", False, "be False", no_graphs),
            ("external_cuda_graph", False, "be False", no_graphs),
        ]
        for field, fine, rule, fix in unsupported:
            if getattr(self, field, fine) != fine:  # a field this version lacks is fine
                raise OptionError(f"{field} ({getattr(self, field)!r}) must {rule}; {fix}")
        if self.adamoe_null_expert_type == "identity" and self.overlap_moe_expert_parallel_comm:
            raise OptionError(
                "overlap_moe_expert_parallel_comm (True) must be False with identity null experts; "
                "the overlapped schedule bypasses AdaMoELayer's identity term (use 'zero' nulls)"
            )
        if (
            self.moe_token_dispatcher_type == "flex"
            and self.moe_flex_dispatcher_backend != "deepep"
        ):
            raise OptionError(
                f"moe_flex_dispatcher_backend ({self.moe_flex_dispatcher_backend!r}) must be "
                "'deepep' with AdaMoE; only the DeepEP manager masks null slots"
            )
