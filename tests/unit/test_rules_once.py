"""Each rule once: the AdaMoE rules are one checker that the pretraining options, Megatron's
AdaMoEConfig and the Hugging Face configuration all call, so a bad value gets the same line
from each (in its own field names), and the options meet every AdaMoE rule before any process
starts; checking changes nothing."""

from __future__ import annotations

import copy
import os

import pytest

from megatron_adamoe.hf.configuration_adamoe import AdaMoEHFConfig
from megatron_adamoe.options import PretrainArguments, load_arguments, resolve, validate
from tests.builders import adamoe_config
from tests.indexed_data import write_indexed_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_CONFIG = os.path.join(REPO, "configs", "cpu_adamoe_tiny.yaml")


@pytest.fixture
def data(tmp_path):
    write_indexed_dataset(str(tmp_path / "corpus_text"), [2100] * 200)
    (tmp_path / "tok.model").write_bytes(b"")
    return {"data_path": [str(tmp_path / "corpus_text")], "tokenizer_model": str(tmp_path / "t")}


def _message(build) -> str:
    with pytest.raises(ValueError) as info:
        build()
    return str(info.value)


# (options / AdaMoEConfig values, HF config values, the rule's line with {k}, {m}, ... as the
# caller spells the fields); the models have n = 4 true experts and 2 MoE layers.
SHARED = {
    "k over n + m": (
        dict(moe_router_topk=9, adamoe_num_null_experts=4),
        dict(num_experts_per_tok=9, num_null_experts=4),
        "{k} (9) must be an integer in [1, {n} + {m} = 8]; lower it or add null experts (k "
        "counts picks over true and null experts)",
    ),
    "null type": (
        dict(adamoe_null_expert_type="copy"),
        dict(null_expert_type="copy"),
        "{null_type} ('copy') must be one of ('zero', 'identity'); use 'zero' (paper default) "
        "or 'identity'",
    ),
    "top-p threshold": (
        dict(adamoe_router_mode="topp", adamoe_topp_threshold=1.5),
        dict(router_mode="topp", router_topp_threshold=1.5),
        "{topp} (1.5) must be in (0, 1] with {mode} 'topp'; e.g. 0.6",
    ),
    "target range": (
        dict(adamoe_target_load=3.0),
        dict(router_target_load=3.0, router_null_bias=True),
        "{target} (3.0) must be in (0, 3) (per layer); a load of 3 leaves nothing to the null "
        "experts",
    ),
    "target per layer": (
        dict(adamoe_target_load=[1.0, 1.2, 1.4]),
        dict(router_target_load=[1.0, 1.2, 1.4], router_null_bias=True),
        "{target} ([1.0, 1.2, 1.4]) must list one load per MoE layer (2); or give one number "
        "for all",
    ),
}
NAMES = {
    "options": dict(
        k="moe_router_topk",
        n="num_experts",
        m="adamoe_num_null_experts",
        null_type="adamoe_null_expert_type",
        topp="adamoe_topp_threshold",
        mode="adamoe_router_mode",
        target="adamoe_target_load",
    ),
    "hf": dict(
        k="num_experts_per_tok",
        n="num_local_experts",
        m="num_null_experts",
        null_type="null_expert_type",
        topp="router_topp_threshold",
        mode="router_mode",
        target="router_target_load",
    ),
}
NAMES["megatron"] = {**NAMES["options"], "n": "num_moe_experts"}
BASE_OPTIONS = dict(
    num_layers=2,
    moe_router_topk=3,
    adamoe_num_null_experts=4,
    expert_model_parallel_size=1,
    moe_aux_loss_coeff=0.01,
    adamoe_aux_loss_coeff_schedule=None,
)
BASE_HF = dict(
    vocab_size=64,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    num_local_experts=4,
    num_null_experts=4,
    num_experts_per_tok=3,
)


@pytest.mark.parametrize("rule", sorted(SHARED))
def test_one_routing_rule_gives_one_line_in_each_callers_names(rule, data):
    megatron_values, hf_values, line = SHARED[rule]
    options = {**data, **BASE_OPTIONS, **megatron_values}
    assert _message(lambda: load_arguments(CPU_CONFIG, options, 2)) == line.format(
        **NAMES["options"]
    )
    config = {**dict(num_layers=2), **megatron_values}
    assert _message(lambda: adamoe_config(**config)) == line.format(**NAMES["megatron"])
    assert _message(lambda: AdaMoEHFConfig(**{**BASE_HF, **hf_values})) == line.format(
        **NAMES["hf"]
    )


# AdaMoEConfig's rules of a Megatron run that the options used to meet only when a rank (or
# --validate-only) built the config: now load_arguments names them before any process starts.
RUN_RULES = {
    "k = 1": (
        dict(moe_router_topk=1, adamoe_num_null_experts=0),
        "adamoe_weight_norm ('true_experts') must be 'none' when moe_router_topk is 1; set "
        "adamoe_weight_norm='none' (one renormalised pick has weight 1: no router gradient)",
    ),
    "controller rate": (
        dict(adamoe_target_load=1.0, adamoe_load_controller_rate=0.0),
        "adamoe_load_controller_rate (0.0) must be > 0, or null for the rate-free controller; "
        "e.g. 0.01",
    ),
    "target schedule range": (
        dict(adamoe_target_load_schedule="linear:1.5,3.5,100"),
        "adamoe_target_load_schedule ('linear:1.5,3.5,100') must stay in (0, 3); a load of 3 "
        "leaves nothing to the null experts",
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
}


@pytest.mark.parametrize("rule", sorted(RUN_RULES))
def test_options_meet_every_adamoe_rule_before_any_process_starts(rule, data):
    values, line = RUN_RULES[rule]
    options = {**data, **BASE_OPTIONS, **values}
    assert _message(lambda: load_arguments(CPU_CONFIG, options, 2)) == line
    assert _message(lambda: adamoe_config(**{**dict(num_layers=2), **values})) == line


def test_checking_changes_nothing_and_resolving_returns_a_new_object():
    args = PretrainArguments(world_size=2, expert_model_parallel_size=2)  # both unset below
    assert args.global_batch_size is None and args.moe_aux_loss_coeff is None
    before = copy.deepcopy(args)
    validate(args, check_io=False)
    assert args == before
    resolved = resolve(args)
    assert args == before and resolved is not args
    assert resolved.global_batch_size == args.micro_batch_size * 2  # data-parallel size 2
    assert resolved.moe_aux_loss_coeff == 0.01
    scheduled = resolve(PretrainArguments(adamoe_aux_loss_coeff_schedule="constant:0.1"))
    assert scheduled.moe_aux_loss_coeff == 0.0
    assert args.data_parallel_size == 2  # computed from the world and the layout
