"""With m = 0 null experts, AdaMoE is stock Megatron-Core top-k, bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.builders import adamoe_config, build_adamoe_layer, build_stock_layer, stock_config

# (AdaMoE weight norm, the stock option it reproduces when m = 0)
EQUIVALENT = [("true_experts", False), ("all_selected", False), ("none", True)]


def build_pair(weight_norm, pre_softmax, **overrides):
    common = dict(moe_router_topk=2, moe_aux_loss_coeff=0.01, moe_z_loss_coeff=1e-3)
    common.update(overrides)
    stock = build_stock_layer(stock_config(moe_router_pre_softmax=pre_softmax, **common))
    adamoe = build_adamoe_layer(
        adamoe_config(
            adamoe_num_null_experts=0,
            adamoe_weight_norm=weight_norm,
            moe_router_pre_softmax=pre_softmax,
            **common,
        )
    )
    adamoe.load_state_dict(stock.state_dict())
    return stock, adamoe


# Upstream router options that keep working with AdaMoE.
ROUTER_OPTIONS = [
    {},
    dict(moe_router_topk_scaling_factor=2.5, moe_router_dtype="fp64"),
    dict(moe_router_dtype="fp32", moe_router_topk=3),
]


@pytest.mark.parametrize("weight_norm,pre_softmax", EQUIVALENT)
@pytest.mark.parametrize("options", ROUTER_OPTIONS, ids=["default", "scaled-fp64", "fp32-k3"])
def test_router_outputs_bit_identical(megatron_env, weight_norm, pre_softmax, options):
    stock, adamoe = build_pair(weight_norm, pre_softmax, **options)
    x = torch.randn(7, 3, stock.config.hidden_size)
    stock_probs, stock_map = stock.router(x)
    adamoe_probs, adamoe_map = adamoe.router(x)
    assert torch.equal(adamoe_map, stock_map)
    assert torch.equal(adamoe_probs, stock_probs)


@pytest.mark.parametrize("weight_norm,pre_softmax", EQUIVALENT)
@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_layer_outputs_and_grads_bit_identical(megatron_env, weight_norm, pre_softmax, dispatcher):
    stock, adamoe = build_pair(weight_norm, pre_softmax, moe_token_dispatcher_type=dispatcher)
    x = torch.randn(7, 3, stock.config.hidden_size)
    grad_out = torch.randn_like(x)
    results = []
    for layer in (stock, adamoe):
        x_layer = x.clone().requires_grad_(True)
        out, _ = layer(x_layer)
        (out * grad_out).sum().backward()
        results.append((out, x_layer.grad, {n: p.grad for n, p in layer.named_parameters()}))
    (stock_out, stock_x_grad, stock_grads), (out, x_grad, grads) = results
    assert torch.equal(out, stock_out)
    assert torch.equal(x_grad, stock_x_grad)
    assert stock_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, stock_grads[name]), name
