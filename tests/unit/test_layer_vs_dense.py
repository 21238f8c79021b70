"""AdaMoELayer (single rank) against the dense per-token reference loop: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from tests.builders import adamoe_config, build_adamoe_layer
from tests.reference import (
    dense_adamoe_layer,
    eq6_loss,
    expected_expert_grads,
    load_full_weights,
    local_expert_grads,
    make_full_weights,
)

SEQ, BATCH, HIDDEN, FFN, NUM_TRUE, NUM_NULL, TOPK = 6, 4, 16, 8, 4, 4, 3
AUX_COEFF = 0.05
TOL = dict(rtol=1e-4, atol=1e-5)  # fp32, different summation order


def run_layer_and_reference(null_type, weight_norm, glu, aux_coeff=AUX_COEFF, seed=11):
    config = adamoe_config(
        hidden_size=HIDDEN,
        moe_ffn_hidden_size=FFN,
        num_moe_experts=NUM_TRUE,
        adamoe_num_null_experts=NUM_NULL,
        moe_router_topk=TOPK,
        adamoe_null_expert_type=null_type,
        adamoe_weight_norm=weight_norm,
        moe_aux_loss_coeff=aux_coeff,
        gated_linear_unit=glu,
    )
    layer = build_adamoe_layer(config)
    weights = make_full_weights(seed, HIDDEN, FFN, NUM_TRUE, NUM_NULL, glu=glu, router_scale=1.0)
    load_full_weights(layer, weights, glu=glu)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    grad_out = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)

    x_layer = x.clone().requires_grad_(True)
    out, bias = layer(x_layer)
    assert bias is None
    (out * grad_out).sum().backward()

    ref_weights = make_full_weights(
        seed, HIDDEN, FFN, NUM_TRUE, NUM_NULL, glu=glu, router_scale=1.0
    ).requires_grad_()
    x_ref = x.clone().view(-1, HIDDEN).requires_grad_(True)
    y_ref, selections = dense_adamoe_layer(
        x_ref, ref_weights, TOPK, weight_norm, null_type, glu=glu
    )
    loss = (y_ref * grad_out.view(-1, HIDDEN)).sum()
    if aux_coeff:
        loss = loss + eq6_loss(x_ref, ref_weights.router, TOPK, NUM_NULL, aux_coeff)
    loss.backward()
    return layer, out, x_layer, ref_weights, y_ref, x_ref, selections


@pytest.mark.parametrize("null_type", ["zero", "identity"])
@pytest.mark.parametrize("weight_norm", ["true_experts", "all_selected", "none"])
def test_layer_matches_dense_loop(megatron_env, null_type, weight_norm):
    glu = weight_norm == "all_selected"  # cover gated experts in some cases, plain in others
    layer, out, x_layer, ref, y_ref, x_ref, selections = run_layer_and_reference(
        null_type, weight_norm, glu
    )
    num_true_picks = [len(true_picks) for true_picks, _ in selections]
    # The data must exercise the adaptive part: bypassed tokens and tokens using all k experts.
    assert 0 in num_true_picks and TOPK in num_true_picks, num_true_picks

    torch.testing.assert_close(out.view(-1, HIDDEN), y_ref, **TOL)
    torch.testing.assert_close(x_layer.grad.view(-1, HIDDEN), x_ref.grad, **TOL)
    torch.testing.assert_close(layer.router.weight.grad, ref.router.grad, **TOL)
    for expert, fc1_grad, fc2_grad in local_expert_grads(layer):
        want_fc1, want_fc2 = expected_expert_grads(ref.fc1.grad, ref.fc2.grad, expert, 0, 1, glu)
        torch.testing.assert_close(fc1_grad, want_fc1, **TOL)
        torch.testing.assert_close(fc2_grad, want_fc2, **TOL)


def test_all_null_tokens_give_zero_routed_output(megatron_env):
    config = adamoe_config(moe_aux_loss_coeff=0.01)
    layer = build_adamoe_layer(config)
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[config.num_moe_experts :, 0] = 50.0  # nulls win for x[..., 0] > 0
    x = torch.randn(5, 2, config.hidden_size)
    x[..., 0] = x[..., 0].abs() + 1.0
    x.requires_grad_(True)
    out, _ = layer(x)
    assert torch.equal(out, torch.zeros_like(out))
    out.sum().backward()  # dispatch and combine of zero rows work in both directions
    assert layer.router.last_routing_stats.bypass_fraction.item() == 1.0
    assert torch.isfinite(layer.router.weight.grad).all()
    for local_mlp in layer.experts.local_experts:
        assert (
            local_mlp.linear_fc1.weight.grad is None or not local_mlp.linear_fc1.weight.grad.any()
        )


def test_null_logits_get_gradient_only_from_aux_loss(megatron_env):
    """Zero nulls + true_experts renormalisation: the task loss cannot reach null rows."""
    layer, *_ = run_layer_and_reference("zero", "true_experts", glu=False, aux_coeff=0.0)
    null_rows = layer.router.weight.grad[NUM_TRUE:]
    assert torch.equal(null_rows, torch.zeros_like(null_rows))
    assert layer.router.weight.grad[:NUM_TRUE].abs().sum() > 0

    layer, *_ = run_layer_and_reference("zero", "true_experts", glu=False, aux_coeff=AUX_COEFF)
    assert layer.router.weight.grad[NUM_TRUE:].abs().sum() > 0


@pytest.mark.parametrize("null_type", ["zero", "identity"])
def test_moe_recompute_gives_the_same_outputs_and_grads(megatron_env, null_type):
    """Selective MoE recompute reruns route/postprocess in backward: identity nulls must still
    reach the router and the input through the recomputed pass."""
    weights = make_full_weights(11, HIDDEN, FFN, NUM_TRUE, NUM_NULL)
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    grad_out = torch.randn(SEQ, BATCH, HIDDEN, generator=generator)
    results = []
    for recompute in (False, True):
        config = adamoe_config(
            hidden_size=HIDDEN,
            moe_ffn_hidden_size=FFN,
            adamoe_null_expert_type=null_type,
            moe_aux_loss_coeff=AUX_COEFF,
            **(
                dict(recompute_granularity="selective", recompute_modules=["moe"])
                if recompute
                else {}
            ),
        )
        layer = build_adamoe_layer(config)
        assert layer.moe_layer_recompute == recompute
        load_full_weights(layer, weights)
        x_layer = x.clone().requires_grad_(True)
        out, _ = layer(x_layer)
        (out * grad_out).sum().backward()
        results.append((out.detach(), x_layer.grad, layer.router.weight.grad))
    (out, x_grad, router_grad), (out_rc, x_grad_rc, router_grad_rc) = results
    torch.testing.assert_close(out_rc, out, **TOL)
    torch.testing.assert_close(x_grad_rc, x_grad, **TOL)
    torch.testing.assert_close(router_grad_rc, router_grad, **TOL)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("null_type", ["zero", "identity"])
def test_router_is_called_through_module_call_so_its_hooks_fire(megatron_env, null_type, recompute):
    """Megatron DDP (overlap_param_gather) waits for parameters in forward pre-hooks: the layer
    must call its router through nn.Module.__call__, once per forward, and the hook must see the
    weight before the router uses it."""
    config = adamoe_config(
        hidden_size=HIDDEN,
        moe_ffn_hidden_size=FFN,
        adamoe_null_expert_type=null_type,
        **(dict(recompute_granularity="selective", recompute_modules=["moe"]) if recompute else {}),
    )
    layer = build_adamoe_layer(config)
    weights = make_full_weights(11, HIDDEN, FFN, NUM_TRUE, NUM_NULL)
    load_full_weights(layer, weights)
    true_router = layer.router.weight.detach().clone()
    calls = []

    def gather_parameters(module, args):  # what DDP's pre-hook does: the real weights arrive
        calls.append(len(args))
        with torch.no_grad():
            module.weight.copy_(true_router)

    with torch.no_grad():
        layer.router.weight.zero_()  # stale until the hook runs
    layer.router.register_forward_pre_hook(gather_parameters)
    x = torch.randn(SEQ, BATCH, HIDDEN, generator=torch.Generator().manual_seed(12))
    out, _ = layer(x.clone().requires_grad_(True))
    assert len(calls) == 1
    y_ref, _ = dense_adamoe_layer(x.view(-1, HIDDEN), weights, TOPK, "true_experts", null_type)
    torch.testing.assert_close(out.view(-1, HIDDEN), y_ref, **TOL)
