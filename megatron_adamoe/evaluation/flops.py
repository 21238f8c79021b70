"""Forward FLOPs per token (2 x multiply-adds of the linears a token goes through; attention's
score and softmax terms, which depend on the context length and are equal in every arm, are left
out) at measured loads, against a top-k baseline with the same true experts and no nulls:
``router n`` and ``k`` picks per layer. MoE models are counted from their config (AdaMoE,
Mixtral; Ada-K's allocators added); Mo-LoRA models from their modules (the frozen base linears
always, each LoRA expert per pick)."""

from __future__ import annotations

from typing import Optional

import torch


def flops_report(
    model: torch.nn.Module,
    loads: list[float],
    baseline_topk: Optional[int],
    module_loads: Optional[dict] = None,
) -> dict:
    """{"flops_per_token", "baseline_flops_per_token", "model_flops_pct", "expert_flops_pct"}
    (percent change against the baseline; None where there is no expert part). Mo-LoRA needs
    ``module_loads`` (LoadMeter.module_loads: its linears differ in size)."""
    from megatron_adamoe.adapters.mo_lora import MoLoRALinear

    wrapped = [m for m in model.modules() if isinstance(m, MoLoRALinear)]
    if wrapped:
        if baseline_topk is None and wrapped[0].router.out_features > wrapped[0].num_experts:
            raise ValueError("Mo-LoRA adapters with null experts need baseline_topk")
        k = baseline_topk or wrapped[0].topk
        ours, base = _mo_lora_flops(model, wrapped, module_loads or {}, k)
    else:
        config = model.config
        if not getattr(config, "num_local_experts", None):  # a dense model
            total = sum(2 * m.in_features * m.out_features for m in _linears(model))
            return _report(total, total, None)
        k = baseline_topk or _true_topk(config)
        ours, base = _moe_flops(config, loads, k)
        adak = getattr(model, "adak", None)
        if adak is not None:  # each MoE layer's allocator: hidden -> C
            ours += len(adak.allocators) * 2 * config.hidden_size * adak.max_k
    expert_pct = 100.0 * (sum(loads) / (len(loads) * k) - 1.0) if loads else None
    return _report(ours, base, expert_pct)


def _report(ours: float, base: float, expert_pct) -> dict:
    return {
        "flops_per_token": ours,
        "baseline_flops_per_token": base,
        "model_flops_pct": 100.0 * (ours / base - 1.0),
        "expert_flops_pct": expert_pct,
    }


def _true_topk(config) -> int:
    """The baseline's k when none is given: the model's own k over true experts (an AdaMoE
    model's k counts null picks too, so its baseline must be named: --baseline-topk)."""
    if getattr(config, "num_null_experts", 0):
        raise ValueError("an AdaMoE model with null experts needs baseline_topk")
    return int(config.num_experts_per_tok)


def _moe_flops(config, loads: list[float], k: int) -> tuple[float, float]:
    hidden = config.hidden_size
    head_dim = getattr(config, "head_dim", None) or hidden // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = 2 * hidden * (q + 2 * kv) + 2 * q * hidden
    ffn = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
    expert = 2 * 3 * hidden * ffn
    true, null = config.num_local_experts, getattr(config, "num_null_experts", 0)
    moe_layers = list(getattr(config, "moe_layers", None) or range(config.num_hidden_layers))
    dense_layers = config.num_hidden_layers - len(moe_layers)
    dense = dense_layers * (attention + 2 * 3 * hidden * config.intermediate_size)
    head = 2 * hidden * config.vocab_size
    ours = (
        dense + head + sum(attention + 2 * hidden * (true + null) + load * expert for load in loads)
    )
    base = dense + head + len(moe_layers) * (attention + 2 * hidden * true + k * expert)
    return float(ours), float(base)


def _mo_lora_flops(model, wrapped, module_loads: dict, k: int) -> tuple[float, float]:
    inside = {id(p) for m in wrapped for p in (*m.lora_A, *m.lora_B, m.router)}
    frozen = sum(2 * m.in_features * m.out_features for m in _linears(model) if id(m) not in inside)
    ours = base = float(frozen)
    for module in wrapped:
        fan_in, fan_out = module.base.in_features, module.base.out_features
        pick = 2 * module.lora_A[0].out_features * (fan_in + fan_out)
        ours += 2 * fan_in * module.router.out_features + module_loads.get(module, 0.0) * pick
        base += 2 * fan_in * module.num_experts + k * pick
    return ours, base


def _linears(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
