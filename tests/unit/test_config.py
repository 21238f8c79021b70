"""Every user-settable AdaMoE value is validated with a one-line message; the messages are
pinned."""

from __future__ import annotations

import pytest

from megatron_adamoe import get_adamoe_gpt_layer_spec
from tests.builders import adamoe_config

PINNED = {
    "no experts": (
        dict(num_moe_experts=None),
        "num_moe_experts (None) must be a positive integer; set it to the true experts",
    ),
    "negative m": (
        dict(adamoe_num_null_experts=-1),
        "adamoe_num_null_experts (-1) must be an integer >= 0; use 0 for plain top-k routing",
    ),
    "null type": (
        dict(adamoe_null_expert_type="copy"),
        "adamoe_null_expert_type ('copy') must be one of ('zero', 'identity'); "
        "use 'zero' (paper default) or 'identity'",
    ),
    "weight norm": (
        dict(adamoe_weight_norm="softmax"),
        "adamoe_weight_norm ('softmax') must be one of ('true_experts', 'all_selected', 'none'); "
        "use 'true_experts' (the paper's choice)",
    ),
    "k over n+m": (
        dict(moe_router_topk=9),
        "moe_router_topk (9) must be an integer in [1, num_moe_experts + adamoe_num_null_experts "
        "= 8]; lower it or add null experts (k counts picks over true and null experts)",
    ),
    "k zero": (dict(moe_router_topk=0), "moe_router_topk (0) must be an integer in [1, "),
    "k one": (
        dict(moe_router_topk=1),
        "adamoe_weight_norm ('true_experts') must be 'none' when moe_router_topk is 1; set "
        "adamoe_weight_norm='none' (one renormalised pick has weight 1: no router gradient)",
    ),
    "pre-softmax": (
        dict(moe_router_pre_softmax=True),
        "moe_router_pre_softmax (True) must be False unless adamoe_weight_norm is 'none'; "
        "adamoe_weight_norm chooses the normalisation; 'none' is the pre-softmax behaviour",
    ),
    "EP divides n": (
        dict(expert_model_parallel_size=3),
        "num_moe_experts (4) must be divisible by expert_model_parallel_size (3); change the "
        "expert count or the EP size (EP shards the true experts; null experts live in the "
        "router)",
    ),
    "capacity": (
        dict(moe_expert_capacity_factor=1.0),
        "moe_expert_capacity_factor (1.0) must be None; AdaMoE is dropless: capacity padding "
        "would ship pad rows over the all-to-all; leave it unset",
    ),
    "pad to capacity": (
        dict(moe_pad_expert_input_to_capacity=True),
        "moe_pad_expert_input_to_capacity (True) must be False; AdaMoE is dropless: padding to "
        "capacity ships pad rows over the all-to-all; leave it False",
    ),
    "router padding for fp8": (
        dict(moe_router_padding_for_fp8=True),
        "moe_router_padding_for_fp8 (True) must be False; it ships pad rows over the all-to-all; "
        "the FP8 grouped GEMM pads each expert's chunk locally instead",
    ),
    "group topk": (
        dict(moe_router_group_topk=1),
        "moe_router_group_topk (1) must be None; group-limited routing is not defined over null "
        "experts",
    ),
    "limited devices": (
        dict(moe_router_topk_limited_devices=1),
        "moe_router_topk_limited_devices (1) must be None; device-limited (group) routing is not "
        "defined over null experts",
    ),
    "enable cuda graph": (
        dict(enable_cuda_graph=True),
        "enable_cuda_graph (True) must be False; per-token expert counts vary, so dispatch sizes "
        "cannot be captured in a CUDA graph",
    ),
    "external cuda graph": (
        dict(external_cuda_graph=True),
        "external_cuda_graph (True) must be False; per-token expert counts vary, so dispatch "
        "sizes cannot be captured in a CUDA graph",
    ),
    "identity with a2a overlap": (
        dict(
            adamoe_null_expert_type="identity",
            overlap_moe_expert_parallel_comm=True,
            expert_model_parallel_size=2,
        ),
        "overlap_moe_expert_parallel_comm (True) must be False with identity null experts; the "
        "overlapped schedule bypasses AdaMoELayer's identity term (use 'zero' nulls)",
    ),
    "router padding": (
        dict(moe_router_padding_for_quantization=True),
        "moe_router_padding_for_quantization (True) must be False; it ships pad rows over the "
        "all-to-all; the FP8 grouped GEMM pads each expert's chunk locally instead",
    ),
    "sigmoid": (
        dict(moe_router_score_function="sigmoid"),
        "moe_router_score_function ('sigmoid') must be 'softmax' with null experts or top-p; "
        "null experts are defined on a softmax over true + null experts (sigmoid is stock "
        "top-k: m = 0)",
    ),
    "router mode": (
        dict(adamoe_router_mode="greedy"),
        "adamoe_router_mode ('greedy') must be one of ('topk', 'topp'); use 'topk' (the "
        "paper's routing) or 'topp'",
    ),
    "top-p threshold": (
        dict(adamoe_router_mode="topp", adamoe_topp_threshold=1.5),
        "adamoe_topp_threshold (1.5) must be in (0, 1] with adamoe_router_mode 'topp'; e.g. 0.6",
    ),
    "threshold without top-p": (
        dict(adamoe_topp_threshold=0.5),
        "adamoe_topp_threshold (0.5) must be unset with adamoe_router_mode 'topk'; set the mode "
        "to 'topp' or drop it",
    ),
    "target without nulls": (
        dict(adamoe_num_null_experts=0, moe_router_topk=2, adamoe_target_load=1.0),
        "adamoe_target_load (1.0) must be unset without null experts; with m = 0 every token "
        "uses exactly k experts",
    ),
    "target range": (
        dict(adamoe_target_load=3.0),
        "adamoe_target_load (3.0) must be in (0, 3) (per layer); a load of 3 leaves nothing to "
        "the null experts",
    ),
    "target over n": (
        dict(num_moe_experts=2, adamoe_target_load=2.0),
        "adamoe_target_load (2.0) must be in (0, 2) (per layer); a token can use at most n = 2 "
        "true experts",
    ),
    "target per layer": (
        dict(num_layers=2, adamoe_target_load=[1.0, 1.2, 1.4]),
        "adamoe_target_load ([1.0, 1.2, 1.4]) must list one load per MoE layer (2); or give one "
        "number for all",
    ),
    "target and schedule": (
        dict(adamoe_target_load=1.0, adamoe_target_load_schedule="linear:1.5,1.0,100"),
        "adamoe_target_load_schedule ('linear:1.5,1.0,100') must not be combined with "
        "adamoe_target_load (1.0); keep only one of them",
    ),
    "target schedule range": (
        dict(adamoe_target_load_schedule="linear:1.5,3.5,100"),
        "adamoe_target_load_schedule ('linear:1.5,3.5,100') must stay in (0, 3); a load of 3 "
        "leaves nothing to the null experts",
    ),
    "bad target schedule": (
        dict(adamoe_target_load_schedule="down:1"),
        "adamoe_target_load_schedule ('down:1') is not a schedule; use 'constant:C'",
    ),
    "controller rate": (
        dict(adamoe_target_load=1.0, adamoe_load_controller_rate=0),
        "adamoe_load_controller_rate (0) must be > 0, or null for the rate-free controller; "
        "e.g. 0.01",
    ),
    "groups": (
        dict(moe_router_num_groups=2, moe_router_group_topk=1),
        "moe_router_num_groups (2) must be None; group-limited routing is not defined over null "
        "experts",
    ),
    "router fusion": (
        dict(moe_router_fusion=True),
        "moe_router_fusion (True) must be False; the fused top-k kernel knows no null experts",
    ),
    "routing replay": (
        dict(moe_enable_routing_replay=True),
        "moe_enable_routing_replay (True) must be False; routing replay records stock top-k "
        "indices, not null-expert picks",
    ),
    "cuda graphs": (
        dict(cuda_graph_impl="local"),
        "cuda_graph_impl ('local') must be 'none'; per-token expert counts vary, so dispatch "
        "sizes cannot be captured in a CUDA graph",
    ),
    "hybridep": (
        dict(moe_token_dispatcher_type="flex", moe_flex_dispatcher_backend="hybridep"),
        "moe_flex_dispatcher_backend ('hybridep') must be 'deepep' with AdaMoE; only the DeepEP "
        "manager masks null slots",
    ),
    "sinkhorn": (
        dict(moe_router_load_balancing_type="sinkhorn"),
        "moe_router_load_balancing_type ('sinkhorn') must be one of ('aux_loss', 'none'); AdaMoE "
        "applies its null-aware loss as 'aux_loss'",
    ),
    "negative coeff": (
        dict(moe_aux_loss_coeff=-0.1),
        "moe_aux_loss_coeff (-0.1) must be one number >= 0; AdaMoE has a single "
        "load-balancing loss",
    ),
    "schedule without loss": (
        dict(moe_router_load_balancing_type="none", adamoe_aux_loss_coeff_schedule="constant:0.1"),
        "adamoe_aux_loss_coeff_schedule ('constant:0.1') must be unset when "
        "moe_router_load_balancing_type is 'none'; set the type to 'aux_loss'",
    ),
    "schedule and coeff": (
        dict(moe_aux_loss_coeff=0.01, adamoe_aux_loss_coeff_schedule="constant:0.1"),
        "adamoe_aux_loss_coeff_schedule ('constant:0.1') must not be combined with "
        "moe_aux_loss_coeff (0.01); keep only one of them",
    ),
    "bad schedule": (
        dict(adamoe_aux_loss_coeff_schedule="bogus"),
        "adamoe_aux_loss_coeff_schedule ('bogus') is not a schedule; use 'constant:C', "
        "'piecewise:C0,STEP1:C1,...' or 'linear:START,END,END_STEP[,START_STEP]'",
    ),
}


def test_newer_megatron_core_capacity_and_balancing_options_are_refused():
    """0.19's per-rank capacity and quantile balancing act on stock routing only."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    assert "moe_router_load_balancing_type ('quantile_balancing') must be one of" in _message(
        dict(moe_router_load_balancing_type="quantile_balancing")
    )
    if "moe_expert_rank_capacity_factor" not in TransformerConfig.__dataclass_fields__:
        pytest.skip("megatron-core < 0.19 has no moe_expert_rank_capacity_factor")
    assert _message(dict(moe_expert_rank_capacity_factor=1.5)) == (
        "moe_expert_rank_capacity_factor (1.5) must be None; AdaMoE is dropless: a per-rank "
        "capacity drops tokens; leave it unset"
    )


def _message(overrides) -> str:
    with pytest.raises(ValueError) as error:
        adamoe_config(**overrides)
    return str(error.value)


@pytest.mark.parametrize("name", list(PINNED))
def test_pinned_messages(name):
    overrides, message = PINNED[name]
    with pytest.raises(ValueError) as error:
        adamoe_config(**overrides)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_valid_config_and_schedule():
    config = adamoe_config(
        num_moe_experts=8,
        adamoe_num_null_experts=8,
        moe_router_topk=3,
        adamoe_aux_loss_coeff_schedule="piecewise:0.1,100:0.01",
    )
    assert config.adamoe_num_experts_with_nulls == 16
    schedule = config.aux_loss_coeff_schedule()
    assert (schedule(0), schedule(100)) == (0.1, 0.01)
    assert adamoe_config(moe_aux_loss_coeff=0.02).aux_loss_coeff_schedule()(10**9) == 0.02
    no_loss = adamoe_config(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.5)
    assert no_loss.aux_loss_coeff_schedule()(0) == 0.0
    # k = 1 is fine with unnormalised weights (and needs upstream's pre-softmax flag).
    adamoe_config(moe_router_topk=1, adamoe_weight_norm="none", moe_router_pre_softmax=True)


def test_load_control_settings():
    config = adamoe_config(num_layers=3, moe_layer_freq=[1, 0, 1], adamoe_target_load=[0.5, 1.2])
    assert config.adamoe_load_controlled and config.adamoe_moe_layer_numbers() == [1, 3]
    assert config.target_load_schedule(3)(0) == 1.2
    annealed = adamoe_config(adamoe_target_load_schedule="linear:1.5,1.0,100")
    assert annealed.target_load_schedule(1)(50) == pytest.approx(1.25)
    # Expert bias with null experts holds the balanced load k n / (n + m) = 3 * 4 / 8.
    bias = adamoe_config(moe_router_enable_expert_bias=True)
    assert bias.moe_router_enable_expert_bias and bias.target_load_schedule(1)(0) == 1.5
    assert adamoe_config().target_load_schedule(1) is None
    # m = 0: expert bias on softmax (AdaMoE's) or sigmoid (stock) scores, no null bias.
    for score in ("softmax", "sigmoid"):
        stock = adamoe_config(
            adamoe_num_null_experts=0,
            moe_router_topk=2,
            moe_router_enable_expert_bias=True,
            moe_router_score_function=score,
        )
        assert stock.moe_router_enable_expert_bias and not stock.adamoe_load_controlled


def test_layer_spec_needs_experts_and_transformer_engine_for_te():
    with pytest.raises(ValueError, match=r"^num_experts \(None\) must be a positive integer"):
        get_adamoe_gpt_layer_spec(num_experts=None)
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="needs Transformer Engine"):
            get_adamoe_gpt_layer_spec(num_experts=4, use_transformer_engine=True)
