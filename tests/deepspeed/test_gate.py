"""The AdaMoE gate in DeepSpeed-MoE under EP = 2 (2 gloo ranks) against the dense per-token
reference (outputs, input, router and expert gradients, the aux loss), and what DeepSpeed's
fixed [E, C, M] all-to-all ships next to the true routes Megatron's dispatcher ships."""

from __future__ import annotations

import pytest
import torch

from tests.reference import dense_adamoe_layer, eq6_loss, make_full_weights
from tests.spawn import run_distributed

pytestmark = pytest.mark.distributed
HIDDEN, FFN, NUM_TRUE, NUM_NULL, TOPK, TOKENS, COEFF = 16, 8, 4, 4, 3, 24, 0.05


def _inputs(world_size):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(world_size, TOKENS, HIDDEN, generator=generator)
    grad_out = torch.randn(world_size, TOKENS, HIDDEN, generator=generator)
    return x, grad_out


WEIGHT_NORMS = ("true_experts", "all_selected", "none")


def _gate_rank(rank, world_size):
    """Every weight norm in one world (one spawn of the ranks for all three)."""
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    return {norm: _gate_run(rank, world_size, norm) for norm in WEIGHT_NORMS}


def _gate_run(rank, world_size, weight_norm):
    from megatron_adamoe.deepspeed.gate import adamoe_moe

    expert = torch.nn.Sequential(
        torch.nn.Linear(HIDDEN, FFN, bias=False),
        torch.nn.GELU(),
        torch.nn.Linear(FFN, HIDDEN, bias=False),
    )
    moe = adamoe_moe(
        HIDDEN, expert, NUM_TRUE, NUM_NULL, TOPK, ep_size=world_size, weight_norm=weight_norm
    )
    moe.set_deepspeed_parallelism()
    weights = make_full_weights(3, HIDDEN, FFN, NUM_TRUE, NUM_NULL)
    local = NUM_TRUE // world_size
    with torch.no_grad():
        moe.deepspeed_moe.gate.wg.weight.copy_(weights.router)
        for i, mlp in enumerate(moe.deepspeed_moe.experts.deepspeed_experts):
            mlp[0].weight.copy_(weights.fc1[rank * local + i])
            mlp[2].weight.copy_(weights.fc2[rank * local + i])
    x, grad_out = _inputs(world_size)
    x_local = x[rank].clone().unsqueeze(0).requires_grad_(True)  # [1, T, H]
    out, l_aux, exp_counts = moe(x_local)
    ((out * grad_out[rank]).sum() + COEFF * l_aux).backward()
    experts = [
        (rank * local + i, mlp[0].weight.grad, mlp[2].weight.grad)
        for i, mlp in enumerate(moe.deepspeed_moe.experts.deepspeed_experts)
    ]
    return {
        "out": out.detach()[0],
        "x_grad": x_local.grad[0],
        "l_aux": l_aux.detach(),
        "router_grad": moe.deepspeed_moe.gate.wg.weight.grad,
        "experts": experts,
        "shipped": moe.deepspeed_moe.gate.shipped_rows(),
        "counts": exp_counts,
    }


def test_gate_under_ep2_equals_the_dense_loop():
    by_rank = run_distributed(_gate_rank, 2, timeout_s=600)
    for weight_norm in WEIGHT_NORMS:
        _check_against_the_dense_loop([r[weight_norm] for r in by_rank], weight_norm)


def _check_against_the_dense_loop(results, weight_norm):
    x, grad_out = _inputs(2)
    tol = dict(rtol=1e-4, atol=1e-5)
    everyone = make_full_weights(3, HIDDEN, FFN, NUM_TRUE, NUM_NULL).requires_grad_()
    y_all, _ = dense_adamoe_layer(x.reshape(-1, HIDDEN), everyone, TOPK, weight_norm, "zero")
    (y_all * grad_out.reshape(-1, HIDDEN)).sum().backward()  # experts see both ranks' tokens
    for rank, got in enumerate(results):
        ref = make_full_weights(3, HIDDEN, FFN, NUM_TRUE, NUM_NULL).requires_grad_()
        x_ref = x[rank].clone().requires_grad_(True)
        y_ref, selections = dense_adamoe_layer(x_ref, ref, TOPK, weight_norm, "zero")
        aux = eq6_loss(x_ref, ref.router, TOPK, NUM_NULL, 1.0)
        ((y_ref * grad_out[rank]).sum() + COEFF * aux).backward()
        torch.testing.assert_close(got["out"], y_ref.detach(), **tol)
        torch.testing.assert_close(got["x_grad"], x_ref.grad, **tol)
        torch.testing.assert_close(got["l_aux"], aux.detach(), **tol)
        torch.testing.assert_close(got["router_grad"], ref.router.grad, **tol)
        for expert, fc1_grad, fc2_grad in got["experts"]:
            torch.testing.assert_close(fc1_grad, everyone.fc1.grad[expert], **tol)
            torch.testing.assert_close(fc2_grad, everyone.fc2.grad[expert], **tol)
        true_routes = sum(len(true) for true, _ in selections)
        assert got["counts"].sum() == true_routes < TOKENS * TOPK  # null picks are not routes
        routes, shipped = got["shipped"]
        # DeepSpeed ships E x C rows (capacity padding included); Megatron's AdaMoE dispatcher
        # ships the true routes only (tests/distributed: exactly the true assignments).
        assert (
            routes == true_routes
            and shipped == NUM_TRUE * max(int(r["counts"].max()) for r in results) > routes
        )
