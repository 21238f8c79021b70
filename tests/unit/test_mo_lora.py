"""Mo-LoRA on dense HF models against independent references: a per-token loop over the paper's
routing rule, the authors' aux loss written out, the base model itself (B = 0); adapters saved
and loaded; every bad setting one line."""

from __future__ import annotations

import pytest
import torch

from megatron_adamoe.adapters import (
    MoLoRAConfig,
    apply_mo_lora,
    load_mo_lora,
    mo_lora_aux_loss,
    mo_lora_modules,
    routing_statistics,
    save_mo_lora,
)
from megatron_adamoe.adapters.mo_lora import MoLoRALinear
from megatron_adamoe.errors import OptionError


def _tiny_llama(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def _reference(module: MoLoRALinear, x_TH: torch.Tensor, weight_norm: str) -> torch.Tensor:
    """Token by token: p = softmax over the n + m router logits, the k largest, the true ones
    among them computed, weighted by p (none), p over the picks (all_selected) or p over the
    true picks (true_experts)."""
    n = module.num_experts
    rows = []
    for x_H in x_TH:
        p_X = torch.softmax(module.router.weight @ x_H, dim=0)
        picks = torch.topk(p_X, module.topk).indices.tolist()
        true = [i for i in picks if i < n]
        denominator = {
            "none": 1.0,
            "all_selected": sum(p_X[i] for i in picks),
            "true_experts": sum(p_X[i] for i in true) if true else 1.0,
        }[weight_norm]
        y = module.base.weight @ x_H + (0 if module.base.bias is None else module.base.bias)
        for i in true:
            update = module.lora_B[i].weight @ (module.lora_A[i].weight @ x_H)
            y = y + p_X[i] / denominator * update * module.scaling
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("weight_norm", ["true_experts", "all_selected", "none"])
@pytest.mark.parametrize("num_null", [0, 4])
def test_forward_and_gradients_equal_the_per_token_loop(weight_norm, num_null):
    torch.manual_seed(1)
    config = MoLoRAConfig(num_null_experts=num_null, topk=2, dropout=0.0, weight_norm=weight_norm)
    module = MoLoRALinear(torch.nn.Linear(12, 10, dtype=torch.float64), config).double()
    for lora_B in module.lora_B:  # B = 0 would hide the experts
        torch.nn.init.normal_(lora_B.weight)
    x = torch.randn(3, 7, 12, dtype=torch.float64)
    grad_out = torch.randn(3, 7, 10, dtype=torch.float64)
    results = []
    for run in (lambda v: module(v), lambda v: _reference(module, v.view(-1, 12), weight_norm)):
        module.zero_grad()
        x_run = x.clone().requires_grad_(True)
        out = run(x_run).view(3, 7, 10)
        (out * grad_out).sum().backward()
        grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
        results.append((out.detach(), x_run.grad, grads))
    (out, x_grad, grads), (ref_out, ref_x_grad, ref_grads) = results
    # ops takes each softmax in float32 (as Megatron's router does), the loop in float64.
    close = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out, ref_out, **close)
    torch.testing.assert_close(x_grad, ref_x_grad, **close)
    assert grads.keys() == ref_grads.keys() and "router.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name, **close)
    assert not module.base.weight.requires_grad


def test_with_b_zero_the_wrapped_model_is_its_base_and_only_adapters_train():
    base = _tiny_llama()
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = base(tokens).logits
    before = {n: p.clone() for n, p in base.named_parameters()}
    model = apply_mo_lora(base, MoLoRAConfig())
    wrapped = mo_lora_modules(model)
    assert len(wrapped) == 2 * 7  # q k v o gate up down in each of 2 layers
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, expected, rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        any(part in n for part in (".router.", ".lora_A.", ".lora_B.")) for n in trainable
    )
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        out = model(tokens, labels=tokens)
        (out.loss + mo_lora_aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = dict(model.named_parameters())
    for name, value in before.items():  # the base, bit for bit
        wrapped_name = name.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
        key = wrapped_name if wrapped_name in after else name
        assert torch.equal(after[key], value), name
    assert any(m.lora_B[0].weight.abs().sum() > 0 for m in wrapped.values())


def _authors_aux_loss(model, config) -> torch.Tensor:
    """The AdaMoE authors' definition, written out: per decoder layer, the router logits of its
    wrapped linears concatenated; counts of top-k picks per expert, the null experts' counts
    replaced by their mean; X * sum(f_i * P_i) with f the counts' shares and P the mean
    probabilities; summed over layers; times the coefficient."""
    n, x = config.num_experts, config.num_experts + config.num_null_experts
    total = 0.0
    for layer in model.model.layers:
        logits = torch.cat(
            [m.last_router_logits for m in layer.modules() if isinstance(m, MoLoRALinear)]
        )
        probs = torch.softmax(logits, dim=-1)
        picks = torch.topk(probs, config.topk, dim=-1).indices.reshape(-1)
        counts = torch.nn.functional.one_hot(picks, x).sum(0).float()
        counts[n:] = counts[n:].mean()
        total = total + x * torch.sum(counts / counts.sum() * probs.mean(0))
    return total * config.aux_loss_coef


def test_aux_loss_is_the_authors_per_layer_loss_and_stats_are_logged():
    config = MoLoRAConfig(topk=3, num_null_experts=4, aux_loss_coef=0.01)
    model = apply_mo_lora(_tiny_llama(), config)
    tokens = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    model(tokens)
    torch.testing.assert_close(mo_lora_aux_loss(model), _authors_aux_loss(model, config))
    stats = routing_statistics(model)
    assert list(stats) == ["model.layers.0", "model.layers.1"]
    for layer in stats.values():
        assert 0 <= layer["load"] <= 3 and sum(layer["k_eff"]) == pytest.approx(1.0)


def test_every_expert_takes_part_when_no_token_picks_it():
    """All picks null: every LoRA expert still runs (on no rows) and gets a gradient, so
    data-parallel ranks touch the same parameters."""
    config = MoLoRAConfig(num_null_experts=4, topk=2, dropout=0.0)
    module = MoLoRALinear(torch.nn.Linear(6, 5), config)
    with torch.no_grad():
        module.router.weight.zero_()
        module.router.weight[4:] = 1.0  # nulls win for positive inputs
    x = torch.rand(4, 6) + 0.1
    out = module(x)
    out.sum().backward()
    torch.testing.assert_close(out, module.base(x))
    for lora_A, lora_B in zip(module.lora_A, module.lora_B):
        assert lora_A.weight.grad is not None and lora_B.weight.grad is not None


def test_saved_adapters_load_on_a_fresh_base_and_generate(tmp_path):
    model = apply_mo_lora(_tiny_llama(), MoLoRAConfig(topk=2))
    with torch.no_grad():
        for module in mo_lora_modules(model).values():
            for lora_B in module.lora_B:
                torch.nn.init.normal_(lora_B.weight, std=0.05)
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = model(tokens).logits
    save_mo_lora(model, str(tmp_path / "adapters"))
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == [
        "mo_lora_adapters.safetensors",
        "mo_lora_config.json",
    ]
    loaded = load_mo_lora(_tiny_llama(), str(tmp_path / "adapters"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, expected, rtol=0, atol=0)
    cached = loaded.generate(tokens, max_new_tokens=8, do_sample=False, use_cache=True)
    uncached = loaded.generate(tokens, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape == (1, 20)


def test_bad_settings_are_one_line_each(tmp_path):
    cases = [
        (dict(topk=9), "topk (9) must be an integer in [1, num_experts + num_null_experts = 8]"),
        (dict(rank=0), "rank (0) must be a positive integer; e.g. 8"),
        (
            dict(null_expert_type="identity"),
            "null_expert_type ('identity') must be 'zero' for Mo-LoRA: an identity null would "
            "add the input to a linear's output, which an adapter has no place for",
        ),
        (dict(dropout=1.0), "dropout (1.0) must be in [0, 1); e.g. 0.05"),
        (dict(weight_norm="softmax"), "weight_norm ('softmax') must be one of"),
    ]
    for settings, message in cases:
        with pytest.raises(OptionError) as error:
            MoLoRAConfig(**settings)
        assert str(error.value).startswith(message), str(error.value)
    with pytest.raises(OptionError) as error:
        apply_mo_lora(_tiny_llama(), MoLoRAConfig(target_modules=("q_proj", "c_attn")))
    assert str(error.value) == (
        "target_modules (['c_attn']) must name linears of the model; LlamaForCausalLM has "
        "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']"
    )
    model = apply_mo_lora(_tiny_llama(), MoLoRAConfig())
    with pytest.raises(OptionError) as error:
        next(iter(mo_lora_modules(model).values())).merge()
    assert str(error.value).startswith("merge (Mo-LoRA) is impossible: each token's update")
    save_mo_lora(model, str(tmp_path / "a"))
    other = _tiny_llama()
    other.config.hidden_size = 64  # another base
    with pytest.raises(OptionError) as error:
        load_mo_lora(other, str(tmp_path / "a"))
    assert str(error.value).startswith(
        f"adapters ('{tmp_path / 'a'}') must be loaded on the base they were made for: its "
        "hidden_size was 32, this model's is 64"
    )
