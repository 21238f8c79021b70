"""adamoe-eval's measured Load and FLOPs against independent references: the rows each expert
actually received (hooks on the experts), and torch's own FLOP counter over a real forward."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from megatron_adamoe.evaluation.flops import flops_report
from megatron_adamoe.evaluation.load_meter import LoadMeter

TOKENS = 40


def _adamoe():
    from megatron_adamoe.hf import AdaMoEForCausalLM, AdaMoEHFConfig

    config = AdaMoEHFConfig(
        vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12,
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
        num_null_experts=4, num_experts_per_tok=3, max_position_embeddings=32,
    )  # fmt: skip
    config._attn_implementation = "eager"  # the attention scores as matmuls the counter counts
    torch.manual_seed(0)
    return AdaMoEForCausalLM(config).eval()


def _one_token_sequences():
    """TOKENS sequences of one token: attention scores are then 2 x 2 x q FLOPs per token."""
    return torch.randint(0, 64, (TOKENS, 1), generator=torch.Generator().manual_seed(2))


def _counted_flops(model, tokens) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(tokens)
    return counter.get_total_flops()


def _count_expert_rows(model) -> dict:
    """{layer: rows its experts received}, filled by hooks on the experts as the model runs."""
    rows = {}
    for index, layer in enumerate(model.model.layers):
        for expert in layer.block_sparse_moe.experts:
            expert.register_forward_hook(
                lambda m, i, o, index=index: rows.__setitem__(
                    index, rows.get(index, 0) + i[0].size(0)
                )
            )
    return rows


def test_adamoe_load_is_the_rows_experts_received_and_flops_match_torchs_counter():
    model = _adamoe()
    rows = _count_expert_rows(model)
    tokens = _one_token_sequences()
    with LoadMeter(model) as meter:
        counted = _counted_flops(model, tokens)
        loads = meter.loads()
    assert loads == [rows[0] / TOKENS, rows[1] / TOKENS]
    assert 0 < sum(loads) < 2 * 3  # nulls took some of the k = 3 picks
    report = flops_report(model, loads, baseline_topk=2)
    attention_scores = 2 * 2 * 2 * 8 * 2  # per token: QK^T and PV, 2 heads of dim 8, 2 layers
    assert report["flops_per_token"] * TOKENS == counted - attention_scores * TOKENS
    assert report["expert_flops_pct"] == pytest.approx(100 * (sum(loads) / 4 - 1))
    # the baseline: the same model with the null rows gone at k = 2, counted the same way
    baseline = _top2_twin(model)
    base_counted = _counted_flops(baseline, tokens) - attention_scores * TOKENS
    assert report["baseline_flops_per_token"] * TOKENS == base_counted


def _top2_twin(model):
    from megatron_adamoe.hf import AdaMoEForCausalLM

    config = model.config.to_dict()
    config.update(num_null_experts=0, num_experts_per_tok=2)
    twin_config = type(model.config)(**config)
    twin_config._attn_implementation = "eager"
    twin = AdaMoEForCausalLM(twin_config).eval()
    state = model.state_dict()
    for name, tensor in twin.state_dict().items():
        tensor.copy_(state[name][: tensor.size(0)] if name.endswith("gate.weight") else state[name])
    return twin


def test_mo_lora_load_and_flops_match_the_rows_and_torchs_counter():
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_adamoe.adapters import MoLoRAConfig, apply_mo_lora

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    config._attn_implementation = "eager"
    model = LlamaForCausalLM(config)  # fmt: skip
    apply_mo_lora(model, MoLoRAConfig(num_experts=4, num_null_experts=4, topk=2))
    for module in model.modules():
        if hasattr(module, "lora_B"):
            for b in module.lora_B:
                torch.nn.init.normal_(b.weight)
    tokens = _one_token_sequences()
    with LoadMeter(model.eval()) as meter:
        counted = _counted_flops(model, tokens)
        loads, module_loads = meter.loads(), meter.module_loads()
    assert len(loads) == 2 and all(0 < load < 2 for load in loads)
    report = flops_report(model, loads, baseline_topk=2, module_loads=module_loads)
    attention_scores = 2 * 2 * 16 * 2  # per token: QK^T and PV over 2 heads x 8, 2 layers
    assert report["flops_per_token"] * TOKENS == pytest.approx(counted - attention_scores * TOKENS)
    assert report["expert_flops_pct"] == pytest.approx(100 * (sum(loads) / 4 - 1))


def test_a_fixed_k_moe_is_its_own_baseline():
    """transformers' Mixtral: load k in every layer, no FLOPs change (its fused experts are not
    visible to torch's counter; the formula is the AdaMoE one, checked above)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                           num_experts_per_tok=2, max_position_embeddings=32)  # fmt: skip
    mixtral = MixtralForCausalLM(config).eval()
    with LoadMeter(mixtral) as meter, torch.no_grad():
        mixtral(_one_token_sequences())
        loads = meter.loads()
    assert loads == [2.0, 2.0]
    report = flops_report(mixtral, loads, baseline_topk=None)
    assert report["model_flops_pct"] == 0 and report["expert_flops_pct"] == 0
    with pytest.raises(ValueError):
        flops_report(_adamoe(), [1.0, 1.0], baseline_topk=None)  # nulls: the baseline must be named


def test_ada_k_load_is_the_rows_experts_received_and_flops_match_torchs_counter():
    """A top-2 model (m = 0) routed by Ada-K allocators: the Load is each token's chosen k as
    the experts saw it, and the FLOPs (the allocators' included) are torch's count."""
    from megatron_adamoe.adak import AdaK
    from megatron_adamoe.hf import AdaMoEForCausalLM

    config = _adamoe().config
    config.num_null_experts, config.num_experts_per_tok = 0, 2
    torch.manual_seed(0)
    model = AdaMoEForCausalLM(config).eval()
    model.adak = AdaK(model)
    with torch.no_grad():
        for allocator in model.adak.allocators:
            allocator.proj.weight.normal_(std=1.0)
    rows = _count_expert_rows(model)
    tokens = _one_token_sequences()
    with LoadMeter(model) as meter:
        counted = _counted_flops(model, tokens)
        loads = meter.loads()
    assert loads == [rows[0] / TOKENS, rows[1] / TOKENS]
    assert all(load != 2.0 for load in loads)  # the allocators, not top-2, chose the counts
    report = flops_report(model, loads, baseline_topk=2)
    attention_scores = 2 * 2 * 2 * 8 * 2
    assert report["flops_per_token"] * TOKENS == counted - attention_scores * TOKENS
    assert report["expert_flops_pct"] == pytest.approx(100 * (sum(loads) / 4 - 1))
