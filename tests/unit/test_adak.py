"""Ada-K: the allocator-routed blocks against a per-token loop that takes the frozen router's
top-k_t for each token's k_t (AdaMoE with and without nulls, transformers' Mixtral), the PPO
objective against an independent computation, saving and reloading allocators, and training on
a tiny model: a huge lambda drives k to its minimum, lambda 0 raises it where more experts help."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_adamoe.adak import AdaK, AdaKOptions, AdaKTrainer, moe_blocks
from megatron_adamoe.adak.ppo import clip_fraction, clipped_surrogate_loss, layer_advantages
from megatron_adamoe.adak.trainer import mean_k
from megatron_adamoe.errors import OptionError
from tests.hf_models import tiny_llama_config
from tests.reference import choose_experts

TOL = dict(rtol=1e-5, atol=1e-6)


def _adamoe(num_null=4, topk=3, null_type="zero", weight_norm="true_experts", layers=2, seed=0):
    from megatron_adamoe.hf import AdaMoEForCausalLM, AdaMoEHFConfig

    config = AdaMoEHFConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_null_experts=num_null,
        num_experts_per_tok=topk,
        null_expert_type=null_type,
        router_weight_norm=weight_norm,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    return AdaMoEForCausalLM(config).eval()


def _mixtral(seed=0):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(seed)
    model = MixtralForCausalLM(config).eval()
    for name, parameter in model.named_parameters():  # transformers 5 leaves experts empty
        if "experts" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    return model


def _random_allocators(adak, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for allocator in adak.allocators:
            allocator.proj.weight.copy_(
                torch.randn(allocator.proj.weight.shape, generator=generator)
            )


def _weights(p_X, picks, num_true, weight_norm):
    true = [i for i in picks if i < num_true]
    mass_selected = sum(p_X[i] for i in picks)
    mass_null = sum((p_X[i] for i in picks if i >= num_true), torch.zeros(()))
    if weight_norm == "true_experts":
        denominator, identity = (
            (sum(p_X[i] for i in true) if true else None),
            mass_null / mass_selected,
        )
    elif weight_norm == "all_selected":
        denominator, identity = mass_selected, mass_null / mass_selected
    else:
        denominator, identity = 1.0, mass_null
    return {i: p_X[i] / denominator for i in true}, identity


@pytest.mark.parametrize(
    ("num_null", "null_type", "weight_norm"),
    [(0, "zero", "true_experts"), (4, "zero", "true_experts"), (4, "identity", "all_selected")],
)
def test_adamoe_block_routed_by_allocator_equals_the_per_token_loop(
    num_null, null_type, weight_norm
):
    model = _adamoe(num_null=num_null, null_type=null_type, weight_norm=weight_norm)
    adak = AdaK(model)
    assert adak.max_k == 4 + num_null and len(adak.allocators) == 2
    _random_allocators(adak)
    block = moe_blocks(model)[0]
    x_BSH = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out_BSH, _ = block(x_BSH)
    step = adak.steps[0]
    weight_CH = adak.allocators[0].proj.weight
    ks = []
    for t, x_H in enumerate(x_BSH.reshape(-1, 16)):
        allocator_C = torch.log_softmax(weight_CH @ x_H, dim=-1)
        k = int(allocator_C.argmax()) + 1
        ks.append(k)
        assert int(step.k_T[t]) == k
        torch.testing.assert_close(step.log_prob_T[t], allocator_C[k - 1], **TOL)
        logits_X = block.gate.weight @ x_H
        picks = choose_experts(logits_X, k)
        weights, identity = _weights(torch.softmax(logits_X, dim=-1), picks, 4, weight_norm)
        want_H = sum((w * block.experts[i](x_H) for i, w in weights.items()), torch.zeros(16))
        if null_type == "identity":
            want_H = want_H + identity * x_H
        torch.testing.assert_close(out_BSH.reshape(-1, 16)[t], want_H, **TOL)
        assert int(step.true_experts_T[t]) == sum(i < 4 for i in picks)
    assert len(set(ks)) > 2  # the allocators gave tokens different k


@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm", "batched_mm"])
def test_mixtral_block_routed_by_allocator_equals_the_per_token_loop(experts_implementation):
    model = _mixtral()
    model.set_experts_implementation(experts_implementation)
    adak = AdaK(model)
    assert adak.max_k == 4 and adak.default_k == [2, 2]
    _random_allocators(adak)
    block = moe_blocks(model)[1]
    experts = block.experts
    seen = []
    experts.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    x_BSH = torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out_BSH = block(x_BSH)
    # grouped_mm / batched_mm leave a "no expert" index's rows uninitialised outside expert
    # parallelism (NaN * 0 = NaN at random): every index handed to the experts must be real.
    assert 0 <= int(seen[0].min()) and int(seen[0].max()) < experts.num_experts
    ks = adak.steps[1].k_T
    for t, x_H in enumerate(x_BSH.reshape(-1, 16)):
        p_X = torch.softmax(block.gate.weight @ x_H, dim=-1)
        top = torch.topk(p_X, int(ks[t])).indices.tolist()
        want_H = torch.zeros(16)
        for i in top:
            gate_I, up_I = (experts.gate_up_proj[i] @ x_H).chunk(2)
            expert_H = experts.down_proj[i] @ (F.silu(gate_I) * up_I)
            want_H = want_H + p_X[i] / sum(p_X[j] for j in top) * expert_H
        torch.testing.assert_close(out_BSH.reshape(-1, 16)[t], want_H, **TOL)
    assert len(set(ks.tolist())) > 1
    # Every token at the model's own k: the stock block's output.
    adak.set_mode("replay")
    adak.replay_k = [torch.full((12,), 2)] * 2
    with torch.no_grad():
        replayed = block(x_BSH)
        adak.detach()
        stock = block(x_BSH)
    torch.testing.assert_close(replayed, stock, **TOL)


def test_ppo_objective_equals_an_independent_computation():
    ratios = [0.5, 0.9, 1.0, 1.1, 1.6, 0.7]
    advantages = [1.0, -2.0, 0.5, 3.0, -1.0, -0.5]
    old_LT = torch.tensor([[-1.0, -0.3, -2.0], [-0.7, -1.2, -0.1]])
    new_LT = old_LT + torch.log(torch.tensor(ratios)).view(2, 3)
    advantage_LT = torch.tensor(advantages).view(2, 3)
    eps = 0.2
    terms = [min(r * a, min(max(r, 1 - eps), 1 + eps) * a) for r, a in zip(ratios, advantages)]
    want = -sum(terms) / len(terms)
    got = clipped_surrogate_loss(new_LT, old_LT, advantage_LT, eps)
    assert float(got) == pytest.approx(want, rel=1e-6)
    # clipped both ways: 0.5 (A > 0) is kept as 0.5 (min), 1.6 (A < 0) as 1.6; 1.1 inside
    assert clip_fraction(new_LT, old_LT, eps) == pytest.approx(3 / 6)
    reward, baseline = torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -2.5])
    advantage = layer_advantages(reward, baseline, 3, 0.5)
    want_LT = [[0.25 * 1.0, 0.25 * -0.5], [0.5 * 1.0, 0.5 * -0.5], [1.0, -0.5]]
    torch.testing.assert_close(advantage, torch.tensor(want_LT))


def test_allocators_save_and_reload_to_the_same_choices(tmp_path):
    model = _adamoe()
    adak = AdaK(model)
    _random_allocators(adak, seed=4)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    chosen = [s.k_T.clone() for s in adak.steps]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    adak.save(str(tmp_path))
    adak.detach()
    again = AdaK.load(model, str(tmp_path))
    with torch.no_grad():
        relogits = model(input_ids=ids).logits
    assert all(torch.equal(a, s.k_T) for a, s in zip(chosen, again.steps))
    assert torch.equal(logits, relogits)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_settings_are_one_line_errors():
    with pytest.raises(OptionError, match=r"max_k \(9\) must be in 1..8 \(the experts a router"):
        AdaK(_adamoe(), max_k=9)
    from transformers import LlamaForCausalLM

    with pytest.raises(OptionError, match="must have MoE blocks Ada-K can route"):
        AdaK(LlamaForCausalLM(tiny_llama_config()))
    with pytest.raises(OptionError, match=r"adak clip \(1.5\) is invalid; e.g. 0.2"):
        AdaKOptions(clip=1.5)


def test_flags_for_the_frozen_routers_are_named_as_unused():
    from types import SimpleNamespace

    from megatron_adamoe.adak.finetune import unused_flags

    options = SimpleNamespace(aux_loss_coef=None, aux_loss_coef_per_epoch=[0.01, 0.001])
    assert unused_flags(options) == ["aux_loss_coef_per_epoch"]
    assert unused_flags(SimpleNamespace(aux_loss_coef=None)) == []


def _memorising_model():
    """A one-layer top-2 MoE (m = 0) trained to memorise 8 random sequences with all 4 experts
    per token: taking fewer experts than that then costs likelihood."""
    model = _adamoe(num_null=0, topk=4, layers=1, seed=3)
    data = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(6))
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=data, labels=data).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for block in moe_blocks(model):
        block.topk = 2  # the baseline: the model run as top-2
    return model.eval(), data


@pytest.mark.parametrize(("lam", "direction"), [(50.0, "down"), (0.0, "up")])
def test_ppo_moves_k_with_lambda(lam, direction):
    model, data = _memorising_model()
    adak = AdaK(model)
    trainer = AdaKTrainer(model, adak, AdaKOptions(lam=lam, lr=5e-2, weight_decay=0.0), seed=0)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    first = trainer.train_step(data)
    assert 2.2 < sum(first["k"]) / len(first["k"]) < 2.8  # the uniform start over 1..4
    for _ in range(80):
        logs = trainer.train_step(data)
    if direction == "down":
        # From 2.5 toward 1: a bias-free linear allocator (the paper's) cannot send every
        # state to k = 1 (no half-space holds them all), so it settles a little above.
        assert logs["expected_k"] < 1.4 and mean_k(adak, model, data)[0] < 1.4, logs
    else:
        assert logs["expected_k"] > 3.0 and logs["reward"] > logs["reward_topk"], logs
    assert all(torch.equal(frozen[k], v) for k, v in model.state_dict().items())
