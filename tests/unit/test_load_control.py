"""Compute as a setting: biased selection (expert bias + the controller's null bias) and top-p
routing against the dense per-token reference (outputs and gradients), the controller step,
and m = 0 with expert bias against stock Megatron-Core bit for bit."""

from __future__ import annotations

import pytest
import torch

from megatron_adamoe.mcore.load_control import update_null_biases
from megatron_adamoe.ops.load_control import null_bias_step, probe_offsets_P, true_picks_at_offsets
from megatron_adamoe.ops.losses import null_aware_load_balancing_loss
from tests.builders import adamoe_config, build_adamoe_layer, build_stock_layer, stock_config
from tests.reference import (
    choose_experts,
    dense_adamoe_layer,
    eq6_loss,
    expected_expert_grads,
    load_full_weights,
    local_expert_grads,
    make_full_weights,
)

SEQ, BATCH, HIDDEN, FFN, NUM_TRUE, NUM_NULL, TOPK = 6, 4, 16, 8, 4, 4, 3
TOL = dict(rtol=1e-4, atol=1e-5)
EXPERT_BIAS = torch.tensor([0.3, -0.4, 0.1, 0.0])
NULL_BIAS = 0.6


def _run(null_type, weight_norm, topp=None, biased=True, aux_coeff=0.05, target=1.2):
    config = adamoe_config(
        hidden_size=HIDDEN,
        moe_ffn_hidden_size=FFN,
        num_moe_experts=NUM_TRUE,
        adamoe_num_null_experts=NUM_NULL,
        moe_router_topk=TOPK,
        adamoe_null_expert_type=null_type,
        adamoe_weight_norm=weight_norm,
        moe_aux_loss_coeff=aux_coeff,
        **(dict(adamoe_target_load=target, moe_router_enable_expert_bias=True) if biased else {}),
        **(dict(adamoe_router_mode="topp", adamoe_topp_threshold=topp) if topp else {}),
    )
    layer = build_adamoe_layer(config)
    weights = make_full_weights(5, HIDDEN, FFN, NUM_TRUE, NUM_NULL)
    load_full_weights(layer, weights)
    bias = None
    if biased:
        with torch.no_grad():
            layer.router.expert_bias.copy_(EXPERT_BIAS)
            layer.router.null_bias.fill_(NULL_BIAS)
        bias = torch.cat([EXPERT_BIAS, torch.full((NUM_NULL,), NULL_BIAS)])
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    grad_out = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    x_layer = x.clone().requires_grad_(True)
    out, _ = layer(x_layer)
    (out * grad_out).sum().backward()

    ref = make_full_weights(5, HIDDEN, FFN, NUM_TRUE, NUM_NULL).requires_grad_()
    x_ref = x.clone().view(-1, HIDDEN).requires_grad_(True)
    y_ref, selections = dense_adamoe_layer(
        x_ref, ref, TOPK, weight_norm, null_type, selection_bias=bias, topp=topp
    )
    loss = (y_ref * grad_out.view(-1, HIDDEN)).sum()
    loss = loss + eq6_loss(
        x_ref,
        ref.router,
        TOPK,
        NUM_NULL,
        aux_coeff,
        selection_bias=bias,
        topp=topp,
        target_load=target if biased else None,
    )
    loss.backward()
    return layer, out, x_layer, ref, y_ref, x_ref, selections


def _check(layer, out, x_layer, ref, y_ref, x_ref):
    torch.testing.assert_close(out.view(-1, HIDDEN), y_ref, **TOL)
    torch.testing.assert_close(x_layer.grad.view(-1, HIDDEN), x_ref.grad, **TOL)
    torch.testing.assert_close(layer.router.weight.grad, ref.router.grad, **TOL)
    for expert, fc1_grad, fc2_grad in local_expert_grads(layer):
        want_fc1, want_fc2 = expected_expert_grads(ref.fc1.grad, ref.fc2.grad, expert, 0, 1, False)
        torch.testing.assert_close(fc1_grad, want_fc1, **TOL)
        torch.testing.assert_close(fc2_grad, want_fc2, **TOL)


@pytest.mark.parametrize("null_type", ["zero", "identity"])
@pytest.mark.parametrize("weight_norm", ["true_experts", "all_selected", "none"])
def test_biased_selection_matches_the_dense_loop(megatron_env, null_type, weight_norm):
    layer, out, x_layer, ref, y_ref, x_ref, _ = _run(null_type, weight_norm)
    _check(layer, out, x_layer, ref, y_ref, x_ref)
    # The bias changed the picks of some tokens (else this test would not test it) ...
    x = torch.randn(SEQ * BATCH, HIDDEN, generator=torch.Generator().manual_seed(6))
    weights = make_full_weights(5, HIDDEN, FFN, NUM_TRUE, NUM_NULL)
    bias = torch.cat([EXPERT_BIAS, torch.full((NUM_NULL,), NULL_BIAS)])
    changed = sum(
        choose_experts(weights.router @ t, TOPK, bias) != choose_experts(weights.router @ t, TOPK)
        for t in x
    )
    assert changed > 0
    # ... and the biases are buffers: no gradient path runs through them.
    assert not layer.router.null_bias.requires_grad and not layer.router.expert_bias.requires_grad


@pytest.mark.parametrize("topp", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("weight_norm", ["true_experts", "all_selected", "none"])
def test_top_p_matches_the_dense_loop(megatron_env, weight_norm, topp):
    layer, out, x_layer, ref, y_ref, x_ref, selections = _run(
        "identity", weight_norm, topp=topp, biased=topp == 0.7
    )
    _check(layer, out, x_layer, ref, y_ref, x_ref)
    sizes = {len(true) + len(null) for true, null in selections}
    assert max(sizes) <= TOPK and (topp == 1.0 or min(sizes) < TOPK)  # variable-size picks
    stats = layer.router.last_routing_stats
    assert stats.num_true_assignments == sum(len(true) for true, _ in selections)


def test_controller_step_moves_the_null_bias_by_rate_times_error(megatron_env):
    config = adamoe_config(
        adamoe_target_load=1.0, adamoe_load_controller_rate=0.5, moe_aux_loss_coeff=0.0
    )
    layer = build_adamoe_layer(config)
    layer.router.set_layer_number(1)
    x = torch.randn(5, 2, config.hidden_size, requires_grad=True)
    layer(x)[0].sum().backward()
    layer(x)[0].sum().backward()  # two micro-batches
    load = layer.router.last_routing_stats.load.item()
    assert layer.router.local_load_counts.tolist() == pytest.approx([2 * load * 10, 20.0])
    update_null_biases(layer)
    assert layer.router.null_bias.item() == pytest.approx(0.5 * (load - 1.0))
    assert layer.router.local_load_counts.tolist() == [0.0, 0.0]
    with torch.no_grad():  # evaluation: nothing counted, no step
        layer(x)
    update_null_biases(layer)
    assert layer.router.null_bias.item() == pytest.approx(0.5 * (load - 1.0))


def test_target_share_loss_is_eq6_at_the_balanced_load():
    scores = torch.softmax(torch.randn(10, 8), dim=-1)
    counts = torch.tensor([4.0, 3, 5, 2, 6, 1, 4, 5])
    plain = null_aware_load_balancing_loss(scores, counts, 10, 3, 4, 0.1)
    balanced = null_aware_load_balancing_loss(scores, counts, 10, 3, 4, 0.1, target_load=1.5)
    torch.testing.assert_close(balanced, plain)
    lower = null_aware_load_balancing_loss(scores, counts, 10, 3, 4, 0.1, target_load=1.0)
    assert not torch.allclose(lower, plain)


def test_no_nulls_with_expert_bias_equals_stock_megatron_bit_for_bit(megatron_env):
    """Stock Megatron-Core takes the expert bias with sigmoid scores only: the AdaMoE router with
    m = 0 runs that path unchanged, and Megatron's bias update sees the same token counts."""
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    common = dict(
        moe_router_topk=2,
        moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True,
        moe_aux_loss_coeff=0.01,
    )
    ada = build_adamoe_layer(adamoe_config(adamoe_num_null_experts=0, **common))
    stock = build_stock_layer(stock_config(**common))
    stock.load_state_dict(ada.state_dict())
    for step in range(3):
        x = torch.randn(6, 2, 16, generator=torch.Generator().manual_seed(step))
        outputs = []
        for layer in (ada, stock):
            x_layer = x.clone().requires_grad_(True)
            out, _ = layer(x_layer)
            out.sum().backward()
            outputs.append(
                (
                    out,
                    x_layer.grad,
                    layer.router.weight.grad.clone(),
                    layer.router.local_tokens_per_expert.clone(),
                )
            )
            _update_router_expert_bias([layer], layer.config)
            layer.router.weight.grad = None
        for mine, theirs in zip(*outputs):
            assert torch.equal(mine, theirs)
        assert torch.equal(ada.router.expert_bias, stock.router.expert_bias)
    assert ada.router.expert_bias.abs().sum() > 0


def _loop_true_picks(logits_TX, topk, num_true, bias_X, topp=None):
    return sum(
        sum(i < num_true for i in choose_experts(row, topk, bias_X, topp)) for row in logits_TX
    )


@pytest.mark.parametrize("topp", [None, 0.6])
def test_probe_counts_match_the_per_token_loop(topp):
    logits_TX = torch.randn(40, 8, generator=torch.Generator().manual_seed(3))
    bias_X = torch.tensor([0.3, -0.4, 0.1, 0.0, 0.2, 0.2, 0.2, 0.2])
    offsets_P = probe_offsets_P()
    picks_P = true_picks_at_offsets(logits_TX, 3, 4, offsets_P, bias_X, topp)
    for offset, picks in zip(offsets_P.tolist(), picks_P.tolist()):
        shifted_X = bias_X + torch.tensor([0.0] * 4 + [offset] * 4)
        assert picks == _loop_true_picks(logits_TX, 3, 4, shifted_X, topp), offset
    assert picks_P[0] > picks_P[-1]  # the ladder spans loads from many true picks to few


def test_null_bias_step_interpolates_clamps_and_prefers_no_move():
    offsets = [-1.0, -0.5, 0.0, 0.5, 1.0]
    loads = [2.0, 1.8, 1.4, 1.0, 0.6]
    assert null_bias_step(loads, offsets, 1.2) == pytest.approx(0.25)
    assert null_bias_step(loads, offsets, 1.9) == pytest.approx(-0.75)
    assert null_bias_step(loads, offsets, 2.5) == -1.0  # out of reach: the farthest probe
    assert null_bias_step(loads, offsets, 0.1) == 1.0
    flat = [2.0, 1.5, 1.5, 1.5, 1.0]  # a run of probes on the target: no move
    assert null_bias_step(flat, offsets, 1.5) == 0.0
    assert null_bias_step([2.0, 1.5, 1.5, 1.2, 1.0], [0.5, 1.0, 1.5, 2.0, 2.5], 1.5) == 1.0


@pytest.mark.parametrize("logit_scale", [0.01, 1.0, 10.0])  # a fresh router to a sharp one
@pytest.mark.parametrize("target", [0.8, 2.2])
def test_rate_free_step_meets_the_target_on_the_batch(megatron_env, logit_scale, target):
    """One step (no rate given) moves the null bias to where the same batch, routed by a
    per-token loop, has the target load, whatever the router's logit scale."""
    config = adamoe_config(
        hidden_size=HIDDEN,
        num_moe_experts=NUM_TRUE,
        adamoe_num_null_experts=NUM_NULL,
        moe_router_topk=TOPK,
        adamoe_target_load=target,
        moe_aux_loss_coeff=0.0,
    )
    assert config.adamoe_load_controller_rate is None
    layer = build_adamoe_layer(config)
    layer.router.set_layer_number(1)
    x = torch.randn(64, 4, HIDDEN, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():  # logits of standard deviation logit_scale
        layer.router.weight.mul_(logit_scale / (x.view(-1, HIDDEN) @ layer.router.weight.T).std())
    logits_TX = x.view(-1, HIDDEN) @ layer.router.weight.detach().T
    tokens = logits_TX.size(0)
    for _ in range(2):  # the second step starts from the first one's bias
        layer(x.clone().requires_grad_(True))[0].sum().backward()
        update_null_biases(layer)
        bias_X = torch.tensor([0.0] * NUM_TRUE + [layer.router.null_bias.item()] * NUM_NULL)
        load = _loop_true_picks(logits_TX, TOPK, NUM_TRUE, bias_X) / tokens
        assert load == pytest.approx(target, abs=0.05), (logit_scale, load)


def test_hf_fine_tuning_controller_meets_the_target_without_a_rate():
    """adamoe-finetune's controller (no --load-controller-rate): after one training forward and
    step, each block's null bias gives the target load on that batch."""
    from megatron_adamoe.hf import AdaMoEForCausalLM, AdaMoEHFConfig
    from megatron_adamoe.hf.finetune_trainer import make_controller_callback, moe_blocks

    config = AdaMoEHFConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_local_experts=4,
        num_null_experts=4,
        num_experts_per_tok=3,
        max_position_embeddings=64,
        router_null_bias=True,
        router_target_load=1.0,
    )
    torch.manual_seed(0)
    model = AdaMoEForCausalLM(config)
    callback = make_controller_callback()(model, None)
    ids = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(1))
    model.train()
    model(input_ids=ids)
    callback.on_step_end(None, None, None)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids, output_router_logits=True).router_logits
    for block, logits_TX in zip(moe_blocks(model), logits):
        assert block.null_bias.item() != 0.0
        load = block.route(logits_TX).routing_map_TE.sum(dim=-1).float().mean()
        assert float(load) == pytest.approx(1.0, abs=0.05)


def test_controller_counts_stay_float32_when_the_model_is_cast(megatron_env):
    """Float16Module casts every floating buffer to bf16, where counts above 256 are not exact:
    the router puts the null bias and its counts back in float32 before counting."""
    config = adamoe_config(adamoe_target_load=1.0, moe_aux_loss_coeff=0.0)
    layer = build_adamoe_layer(config)
    layer.router.set_layer_number(1)
    for name in ("null_bias", "local_load_counts", "load_probe_offsets"):
        buffer = getattr(layer.router, name)
        buffer.data = buffer.data.bfloat16()
    x = torch.randn(300, 1, config.hidden_size, requires_grad=True)
    layer(x)[0].sum().backward()
    counts = layer.router.local_load_counts
    assert counts.dtype == torch.float32 and counts[-1].item() == 300.0
    at_zero = layer.router.load_probe_offsets.tolist().index(0.0)  # the routing as it was
    assert counts[at_zero].item() == layer.router.last_routing_stats.num_true_assignments
