"""Pure ops: Eq. 6 on a hand-computed example, routing slots for DeepEP, statistics; and the
schedule grammar of the options."""

from __future__ import annotations

import pytest
import torch

from megatron_adamoe.ops import (
    expected_load,
    null_aware_load_balancing_loss,
    null_expert_topk_routing,
    routing_stats,
    topk_slots_from_routing_map,
)
from megatron_adamoe.options.schedule import StepSchedule

# 4 tokens, 2 true experts (columns 0, 1) + 2 null experts (columns 2, 3), k = 2.
SCORES = torch.tensor(
    [
        [0.40, 0.30, 0.20, 0.10],
        [0.10, 0.20, 0.30, 0.40],
        [0.50, 0.10, 0.30, 0.10],
        [0.25, 0.25, 0.40, 0.10],
    ]
)
PICKS = [(0, 1), (3, 2), (0, 2), (2, 0)]


def counts_of(picks, num_experts=4):
    counts = torch.zeros(num_experts)
    for token_picks in picks:
        counts[list(token_picks)] += 1
    return counts


def test_eq6_on_hand_computed_example():
    # f = counts / (k T) = [3, 1, 3, 1] / 8; nulls averaged: f~ = [.375, .125, .25, .25]
    # P = column means = [.3125, .2125, .3, .175]
    # sum f~ P = .1171875 + .0265625 + .075 + .04375 = .2625;  L = 0.1 * 4 * .2625 = .105
    loss = null_aware_load_balancing_loss(SCORES, counts_of(PICKS), 4, 2, 2, coeff=0.1)
    assert loss.item() == pytest.approx(0.105, abs=1e-7)
    # Balancing nulls individually (Z = 0) would give 0.1 * 4 * .278125 = .11125 instead.
    per_expert = null_aware_load_balancing_loss(SCORES, counts_of(PICKS), 4, 2, 0, coeff=0.1)
    assert per_expert.item() == pytest.approx(0.11125, abs=1e-7)


def test_null_experts_are_not_balanced_against_each_other():
    # Shift a null assignment from null expert 2 to null expert 3: loss and gradient unchanged.
    shifted = [(0, 1), (3, 2), (0, 3), (2, 0)]  # counts [3, 1, 2, 2]: same null total
    scores = SCORES.clone().requires_grad_(True)
    null_aware_load_balancing_loss(scores, counts_of(PICKS), 4, 2, 2, 0.1).backward()
    grad_spread = scores.grad.clone()
    scores.grad = None
    loss = null_aware_load_balancing_loss(scores, counts_of(shifted), 4, 2, 2, 0.1)
    loss.backward()
    assert loss.item() == pytest.approx(0.105, abs=1e-7)
    assert torch.equal(scores.grad, grad_spread)
    assert torch.equal(scores.grad[:, 2], scores.grad[:, 3])  # one null bucket, one pull


def test_routing_keeps_k_picks_over_all_experts_and_true_columns_only():
    logits = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))
    routing = null_expert_topk_routing(logits, topk=4, num_true_experts=8)
    assert routing.routing_map_TX.sum(dim=1).eq(4).all()
    assert routing.probs_TE.shape == routing.routing_map_TE.shape == (64, 8)
    assert torch.equal(routing.routing_map_TE, routing.routing_map_TX[:, :8])
    assert torch.equal(routing.probs_TE > 0, routing.routing_map_TE)
    k_eff = routing.routing_map_TE.sum(dim=1)
    # true_experts norm: a token's true weights sum to 1 when it has any true pick, else 0.
    torch.testing.assert_close(routing.probs_TE.sum(dim=1), (k_eff > 0).float())


def test_routing_stats():
    routing_map = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    stats = routing_stats(routing_map, topk=3)
    assert stats.k_eff_histogram_K1.tolist() == [1.0, 1.0, 2.0, 0.0]
    assert stats.load.item() == pytest.approx(5 / 4)
    assert stats.bypass_fraction.item() == pytest.approx(1 / 4)
    assert stats.null_fraction.item() == pytest.approx(1 - 5 / 12)
    padded = routing_stats(routing_map, topk=3, valid_T=torch.tensor([True, False, True, True]))
    assert padded.num_tokens.item() == 3 and padded.bypass_fraction.item() == 0.0
    assert expected_load(3, 8, 8) == pytest.approx(1.5)


def test_deepep_slots_are_masked_from_the_routing_map():
    # Token 0 uses 2 true experts, token 1 one, token 2 none (all picks null); k = 3.
    routing_map = torch.tensor(
        [[True, False, True, False], [False, False, False, True], [False] * 4]
    )
    probs = torch.tensor([[0.6, 0.0, 0.4, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0] * 4])
    probs_TK, indices_TK = topk_slots_from_routing_map(probs, routing_map, topk=3)
    assert sorted(indices_TK[0].tolist()) == [-1, 0, 2]
    assert sorted(indices_TK[1].tolist()) == [-1, -1, 3]
    assert indices_TK[2].tolist() == [-1, -1, -1]
    assert probs_TK[indices_TK == -1].eq(0).all()
    # A selected expert whose weight underflowed to 0 is still dispatched.
    underflow = topk_slots_from_routing_map(torch.zeros(1, 4), routing_map[:1], topk=3)[1]
    assert sorted(underflow[0].tolist()) == [-1, 0, 2]


@pytest.mark.parametrize(
    "spec,expected",
    [
        ("constant:0.01", {0: 0.01, 10**6: 0.01}),
        ("piecewise:0.1,1000:0.01", {0: 0.1, 999: 0.1, 1000: 0.01, 5000: 0.01}),
        ("piecewise:0.1,10:0.05,20:0", {9: 0.1, 10: 0.05, 25: 0.0}),
        ("linear:0.1,0.01,100", {0: 0.1, 50: 0.055, 100: 0.01, 200: 0.01}),
        ("linear:0.1,0.0,200,100", {50: 0.1, 100: 0.1, 150: 0.05, 300: 0.0}),
    ],
)
def test_schedules(spec, expected):
    schedule = StepSchedule.parse(spec)
    for step, value in expected.items():
        assert schedule(step) == pytest.approx(value)


@pytest.mark.parametrize(
    "spec,message",
    [
        ("0.01", "adamoe_aux_loss_coeff_schedule ('0.01') is not a schedule; use 'constant:C'"),
        ("cosine:0.1", "adamoe_aux_loss_coeff_schedule ('cosine:0.1') is not a schedule;"),
        ("piecewise:0.1,100:0.05,50:0.01", "is malformed (steps must increase); use"),
        ("linear:0.1,0.01", "is malformed (wrong number of fields); use"),
        ("linear:0.1,0.01,10,10", "is malformed (END_STEP must exceed START_STEP)"),
        ("constant:x", "adamoe_aux_loss_coeff_schedule ('constant:x') is malformed"),
        ("constant:-1", "has a negative value; values must be >= 0"),
    ],
)
def test_schedule_errors(spec, message):
    with pytest.raises(ValueError) as error:
        StepSchedule.parse(spec)
    assert message in str(error.value)
    assert "\n" not in str(error.value)
