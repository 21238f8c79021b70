"""AdaMoEConfig: Megatron-Core's TransformerConfig plus the AdaMoE fields, validated together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron_adamoe.errors import OptionError
from megatron_adamoe.mcore import _compat  # noqa: F401  (fails early on an unsupported version)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_adamoe.ops.routing import WEIGHT_NORMS
from megatron_adamoe.ops.schedule import AuxLossCoeffSchedule

NULL_EXPERT_TYPES = ("zero", "identity")
LOAD_BALANCING_TYPES = ("aux_loss", "none")


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
    "piecewise:0.1,1000:0.01" (see megatron_adamoe.ops.schedule). None: a constant
    ``moe_aux_loss_coeff``."""

    def __post_init__(self) -> None:
        self._validate_adamoe()
        super().__post_init__()

    @property
    def adamoe_num_experts_with_nulls(self) -> int:
        return self.num_moe_experts + self.adamoe_num_null_experts

    def aux_loss_coeff_schedule(self) -> AuxLossCoeffSchedule:
        """The coefficient schedule of the null-aware load-balancing loss (zero when disabled)."""
        if self.moe_router_load_balancing_type == "none":
            return AuxLossCoeffSchedule.constant(0.0)
        if self.adamoe_aux_loss_coeff_schedule is not None:
            return AuxLossCoeffSchedule.parse(self.adamoe_aux_loss_coeff_schedule)
        return AuxLossCoeffSchedule.constant(self.moe_aux_loss_coeff)

    def _validate_adamoe(self) -> None:
        def fail(field: str, rule: str, fix: str) -> None:
            raise OptionError(f"{field} ({getattr(self, field)!r}) must {rule}; {fix}")

        n, m, k = self.num_moe_experts, self.adamoe_num_null_experts, self.moe_router_topk
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            fail("num_moe_experts", "be a positive integer", "set --num-experts to the true experts")
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            fail("adamoe_num_null_experts", "be an integer >= 0", "use 0 for plain top-k routing")
        if self.adamoe_null_expert_type not in NULL_EXPERT_TYPES:
            fail(
                "adamoe_null_expert_type",
                f"be one of {NULL_EXPERT_TYPES}",
                "use 'zero' (paper default) or 'identity'",
            )
        if self.adamoe_weight_norm not in WEIGHT_NORMS:
            fail(
                "adamoe_weight_norm",
                f"be one of {WEIGHT_NORMS}",
                "use 'true_experts' (the paper's choice)",
            )
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= n + m:
            fail(
                "moe_router_topk",
                f"be an integer in [1, num_moe_experts + adamoe_num_null_experts = {n + m}]",
                "lower it or add null experts (k counts picks over true and null experts)",
            )
        if k == 1 and self.adamoe_weight_norm != "none":
            fail(
                "adamoe_weight_norm",
                "be 'none' when moe_router_topk is 1",
                "set adamoe_weight_norm='none' (one renormalised pick has weight 1: no router gradient)",
            )
        if self.moe_router_pre_softmax and self.adamoe_weight_norm != "none":
            fail(
                "moe_router_pre_softmax",
                "be False unless adamoe_weight_norm is 'none'",
                "adamoe_weight_norm chooses the normalisation; 'none' is the pre-softmax behaviour",
            )
        if n % self.expert_model_parallel_size != 0:
            fail(
                "num_moe_experts",
                f"be divisible by expert_model_parallel_size ({self.expert_model_parallel_size})",
                "change the EP size (null experts live in the router; EP shards the true experts)",
            )
        self._reject_unsupported_router_options()
        self._validate_aux_loss()

    def _reject_unsupported_router_options(self) -> None:
        pad_rows = (
            "it ships pad rows over the all-to-all; the FP8 grouped GEMM pads each expert's "
            "chunk locally instead"
        )
        no_graphs = "per-token expert counts vary, so dispatch sizes cannot be captured in a CUDA graph"
        no_groups = "group-limited routing is not defined over null experts"
        # Checked before upstream's __post_init__, which rewrites the deprecated aliases
        # (enable_cuda_graph, moe_router_topk_limited_devices, ...) into other fields.
        unsupported = [
            # (field, value that is fine, rule, why / fix)
            ("moe_expert_capacity_factor", None, "be None", "AdaMoE is dropless: capacity padding "
             "would ship pad rows over the all-to-all; leave it unset"),
            ("moe_pad_expert_input_to_capacity", False, "be False", "AdaMoE is dropless: padding to "
             "capacity ships pad rows over the all-to-all; leave it False"),
            ("moe_router_padding_for_quantization", False, "be False", pad_rows),
            ("moe_router_padding_for_fp8", False, "be False", pad_rows),
            ("moe_router_score_function", "softmax", "be 'softmax'", "AdaMoE's null experts are "
             "defined on a softmax over true + null experts"),
            ("moe_router_enable_expert_bias", False, "be False", "the bias update pulls null "
             "experts toward the mean load and fights the null-aware loss; use the aux loss"),
            ("moe_router_num_groups", None, "be None", no_groups),
            ("moe_router_group_topk", None, "be None", no_groups),
            ("moe_router_topk_limited_devices", None, "be None", "device-limited (group) routing "
             "is not defined over null experts"),
            ("moe_router_fusion", False, "be False", "the fused top-k kernel knows no null experts"),
            ("moe_enable_routing_replay", False, "be False", "routing replay records stock top-k "
             "indices, not null-expert picks"),
            ("cuda_graph_impl", "none", "be 'none'", no_graphs),
            ("enable_cuda_graph", False, "be False", no_graphs),
            ("external_cuda_graph", False, "be False", no_graphs),
        ]
        for field, fine, rule, fix in unsupported:
            if getattr(self, field) != fine:
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

    def _validate_aux_loss(self) -> None:
        balancing = self.moe_router_load_balancing_type
        if balancing not in LOAD_BALANCING_TYPES:
            raise OptionError(
                f"moe_router_load_balancing_type ({balancing!r}) must be one of "
                f"{LOAD_BALANCING_TYPES}; AdaMoE applies its null-aware loss as 'aux_loss'"
            )
        if isinstance(self.moe_aux_loss_coeff, (list, tuple)) or self.moe_aux_loss_coeff < 0:
            raise OptionError(
                f"moe_aux_loss_coeff ({self.moe_aux_loss_coeff!r}) must be one number >= 0; "
                "AdaMoE has a single load-balancing loss"
            )
        schedule = self.adamoe_aux_loss_coeff_schedule
        if schedule is None:
            return
        AuxLossCoeffSchedule.parse(schedule)  # raises a ValueError naming the field
        if balancing == "none":
            raise OptionError(
                f"adamoe_aux_loss_coeff_schedule ({schedule!r}) must be unset when "
                "moe_router_load_balancing_type is 'none'; set the type to 'aux_loss'"
            )
        if self.moe_aux_loss_coeff != 0:
            raise OptionError(
                f"adamoe_aux_loss_coeff_schedule ({schedule!r}) must not be combined with "
                f"moe_aux_loss_coeff ({self.moe_aux_loss_coeff}); keep only one of them"
            )
