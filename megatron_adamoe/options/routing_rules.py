"""The rules of AdaMoE's routing settings, written once.

The pretraining options (``options.rules``), Megatron's ``AdaMoEConfig`` (``mcore.config``) and the
Hugging Face configuration (``hf/configuration_adamoe.py``) all call ``routing_violation``, each
naming the fields as it spells them (``ROUTING_NAMES``). A broken rule is one line,
``<field> (<value>) must <rule>; <fix>``.

Standalone: everything below the ``standalone`` marker uses the standard library only, and the HF
configuration, which must load without this package (remote code), carries a generated copy of it
(``python tools/sync_standalone.py`` writes it; tests/unit/test_standalone.py fails on any drift).
"""

from __future__ import annotations

from typing import Optional

# --- standalone: copied into hf/configuration_adamoe.py by tools/sync_standalone.py ---

NULL_EXPERT_TYPES = ("zero", "identity")
WEIGHT_NORMS = ("true_experts", "all_selected", "none")
ROUTER_MODES = ("topk", "topp")

# The routing settings, and how each caller spells them.
ROUTING_NAMES = {
    "options": {
        "num_experts": "num_experts",
        "num_null_experts": "adamoe_num_null_experts",
        "topk": "moe_router_topk",
        "null_expert_type": "adamoe_null_expert_type",
        "weight_norm": "adamoe_weight_norm",
        "router_mode": "adamoe_router_mode",
        "topp_threshold": "adamoe_topp_threshold",
        "target_load": "adamoe_target_load",
    },
    "megatron": {
        "num_experts": "num_moe_experts",
        "num_null_experts": "adamoe_num_null_experts",
        "topk": "moe_router_topk",
        "null_expert_type": "adamoe_null_expert_type",
        "weight_norm": "adamoe_weight_norm",
        "router_mode": "adamoe_router_mode",
        "topp_threshold": "adamoe_topp_threshold",
        "target_load": "adamoe_target_load",
    },
    "mo_lora": {  # megatron_adamoe.adapters.MoLoRAConfig
        "num_experts": "num_experts",
        "num_null_experts": "num_null_experts",
        "topk": "topk",
        "null_expert_type": "null_expert_type",
        "weight_norm": "weight_norm",
        "router_mode": "router_mode",
        "topp_threshold": "topp_threshold",
        "target_load": "target_load",
    },
    "hf": {
        "num_experts": "num_local_experts",
        "num_null_experts": "num_null_experts",
        "topk": "num_experts_per_tok",
        "null_expert_type": "null_expert_type",
        "weight_norm": "router_weight_norm",
        "router_mode": "router_mode",
        "topp_threshold": "router_topp_threshold",
        "target_load": "router_target_load",
    },
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def routing_violation(settings, spelling: str, num_moe_layers: int) -> Optional[str]:
    """The first routing rule ``settings`` breaks, as one line, or None.

    ``settings``: any object with the fields of ``ROUTING_NAMES[spelling]`` (the pretraining
    options, an AdaMoEConfig, an HF config); ``num_moe_layers``: how many MoE layers the model
    has (a per-layer target load lists one value for each)."""
    names = ROUTING_NAMES[spelling]
    value = {key: getattr(settings, name) for key, name in names.items()}

    def broken(key: str, rule: str, fix: str) -> str:
        return f"{names[key]} ({value[key]!r}) must {rule}; {fix}"

    n, m, k = value["num_experts"], value["num_null_experts"], value["topk"]
    if not _is_int(n) or n < 1:
        return broken("num_experts", "be a positive integer", "set it to the true experts")
    if not _is_int(m) or m < 0:
        return broken("num_null_experts", "be an integer >= 0", "use 0 for plain top-k routing")
    if value["null_expert_type"] not in NULL_EXPERT_TYPES:
        return broken(
            "null_expert_type",
            f"be one of {NULL_EXPERT_TYPES}",
            "use 'zero' (paper default) or 'identity'",
        )
    if value["weight_norm"] not in WEIGHT_NORMS:
        return broken(
            "weight_norm", f"be one of {WEIGHT_NORMS}", "use 'true_experts' (the paper's choice)"
        )
    if not _is_int(k) or not 1 <= k <= n + m:
        return broken(
            "topk",
            f"be an integer in [1, {names['num_experts']} + {names['num_null_experts']} = {n + m}]",
            "lower it or add null experts (k counts picks over true and null experts)",
        )
    mode, threshold = value["router_mode"], value["topp_threshold"]
    if mode not in ROUTER_MODES:
        return broken(
            "router_mode", f"be one of {ROUTER_MODES}", "use 'topk' (the paper's routing) or 'topp'"
        )
    if mode == "topp" and (not _is_number(threshold) or not 0 < threshold <= 1):
        return broken(
            "topp_threshold", f"be in (0, 1] with {names['router_mode']} 'topp'", "e.g. 0.6"
        )
    if mode == "topk" and threshold is not None:
        return broken(
            "topp_threshold",
            f"be unset with {names['router_mode']} 'topk'",
            "set the mode to 'topp' or drop it",
        )
    return _target_load_violation(value, names, num_moe_layers, broken)


def _target_load_violation(value, names, num_moe_layers: int, broken) -> Optional[str]:
    n, m, k, target = (
        value["num_experts"],
        value["num_null_experts"],
        value["topk"],
        value["target_load"],
    )
    if target is None:
        return None
    if m == 0:
        return broken(
            "target_load",
            "be unset without null experts",
            "with m = 0 every token uses exactly k experts",
        )
    if isinstance(target, list) and len(target) != num_moe_layers:
        return broken(
            "target_load",
            f"list one load per MoE layer ({num_moe_layers})",
            "or give one number for all",
        )
    limit = min(k, n)
    why = (
        f"a load of {limit} leaves nothing to the null experts"
        if limit == k
        else f"a token can use at most n = {n} true experts"
    )
    for load in target if isinstance(target, list) else [target]:
        if not _is_number(load) or not 0 < load < limit:
            return broken("target_load", f"be in (0, {limit}) (per layer)", why)
    return None
