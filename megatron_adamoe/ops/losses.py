"""Null-aware load-balancing loss (AdaMoE paper Eq. 6).

Pure torch; hf/modeling_adamoe.py carries a generated copy of this loss
(``python tools/sync_standalone.py``; tests/unit/test_standalone.py fails on drift).
Shape legend: T tokens, E true experts, Z null experts, X = E + Z all experts (true experts
first).

    f_i  = (1 / (K T)) * sum_t 1[i in S_t]        fraction of the K*T assignments given to expert i
    P_i  = (1 / T)     * sum_t p_{t,i}            mean router probability (softmax over X)
    f~_i = f_i for true experts; for null experts the mean of f over the nulls
    L    = coeff * X * sum_i f~_i P_i

Nulls form one averaged bucket, so they are never balanced against each other (paper Table 4).
With Z = 0 this is the Switch-Transformer loss, computed with the same operations as Megatron-Core's
``switch_load_balancing_loss_func``.

A target load tau (true experts per token, the load controller's goal): Eq. 6 balances every
expert toward the uniform share 1/X of the K*T assignments, i.e. toward the load K*E/X, and would
pull against any other target. With target shares q_i (sum 1) the loss

    L = coeff * sum_i f~_i P_i / q_i

pushes each P_i down in proportion to f~_i / q_i, so its pressure is even when f~_i = q_i. The
target shares are q_true = tau / (K E) for each true expert (the true experts share tau of each
token's K picks, evenly) and q_null = (1 - tau / K) / Z for each null expert (the null bucket takes
the rest). At tau = K E / X every q_i = 1/X and this is Eq. 6 exactly. So the loss balances the
true experts among themselves and leaves the null bucket at the target's share: it agrees with
the controller, whose bias then stays bounded.
"""

from __future__ import annotations

import torch

# --- standalone: the loss the HF model file carries (tools/sync_standalone.py) ---


def null_aware_assignment_counts(
    assignments_X: torch.Tensor, num_null_experts: int
) -> torch.Tensor:
    """Replace the null experts' assignment counts by their mean (the f~ of Eq. 6, unnormalised)."""
    if num_null_experts == 0:
        return assignments_X
    num_true = assignments_X.numel() - num_null_experts
    assignments_X = assignments_X.float()
    null_mean = assignments_X[num_true:].mean().expand(num_null_experts)
    return torch.cat([assignments_X[:num_true], null_mean])


def target_share_weights(
    num_true_experts: int, num_null_experts: int, topk: int, target_load: float
) -> torch.Tensor:
    """1 / (X q_i) per expert [X] (see the module docstring): 1 for every expert at the balanced
    load K E / X."""
    num_experts = num_true_experts + num_null_experts
    assert num_null_experts > 0 and 0 < target_load < topk
    true_weight = topk * num_true_experts / (num_experts * target_load)
    null_weight = topk * num_null_experts / (num_experts * (topk - target_load))
    return torch.tensor([true_weight] * num_true_experts + [null_weight] * num_null_experts)


def null_aware_load_balancing_loss(
    scores_TX: torch.Tensor,
    assignments_X: torch.Tensor,
    total_num_tokens: int | torch.Tensor,
    topk: int,
    num_null_experts: int,
    coeff: float,
    target_load: float | None = None,
) -> torch.Tensor:
    """Eq. 6 on one rank's share of a batch; with ``target_load``, its target-share form.

    scores_TX:        softmax router probabilities of this rank's tokens (over all X experts).
    assignments_X:    assignment counts per expert over the whole batch (all ranks that share it).
    total_num_tokens: tokens in the whole batch.
    Summing the result over the ranks that share the batch gives the loss of the whole batch, as in
    Megatron's sequence-parallel aux loss.
    """
    num_experts = scores_TX.size(1)
    assert assignments_X.numel() == num_experts and 0 <= num_null_experts < num_experts
    balanced_X = null_aware_assignment_counts(assignments_X, num_null_experts)
    if target_load is not None:
        weights_X = target_share_weights(
            num_experts - num_null_experts, num_null_experts, topk, target_load
        )
        balanced_X = balanced_X * weights_X.to(balanced_X.device)
    aggregated_probs_X = scores_TX.sum(dim=0)
    return torch.sum(aggregated_probs_X * balanced_X) * (
        num_experts * coeff / (topk * total_num_tokens * total_num_tokens)
    )
