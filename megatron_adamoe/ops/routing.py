"""AdaMoE routing math: top-k over true + null experts, and the per-layer routing statistics.

Pure torch: no Megatron, no torch.distributed. Allocates on the input's device. The routing itself
(between the ``standalone`` markers) is also the HF model's: hf/modeling_adamoe.py carries a
generated copy (``python tools/sync_standalone.py``; tests/unit/test_standalone.py fails on drift).

Shape legend:
    T  tokens
    E  true experts (n in the paper)
    Z  null experts (m in the paper)
    X  all experts, X = E + Z; columns [0, E) are true experts, [E, X) null experts
    K  top-k picks per token over all X experts

Weights of the selected experts (``weight_norm``), with p = softmax over all X logits and S the
token's K picks:

    "true_experts"  g_i = p_i / sum_{j in S, j true} p_j         (paper section 3.4, option 2)
    "all_selected"  g_i = p_i / sum_{j in S} p_j                  (paper option 1)
    "none"          g_i = p_i                                     (no renormalisation)

A token whose K picks are all null gets no true weight at all: its routed output is zero.

Identity null experts add ``identity_weight_T * x`` to the routed output. The identity weight is
the null picks' share of the selected probability mass, s = sum_{j in S, j null} p_j / sum_{j in S}
p_j, for "true_experts" and "all_selected" (so it lies in [0, 1]), and the raw mass
sum_{j in S, j null} p_j for "none". Under "all_selected" the true weights and s sum to one: a
convex mix of expert outputs and x. Under "true_experts" the true experts keep the paper's
renormalisation (they sum to one whenever any is picked) and s is added on top; a token whose picks
are all null therefore passes through as y = x.

``scaling_factor`` (Megatron's ``moe_router_topk_scaling_factor``) multiplies the true weights and
the identity weight alike.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_adamoe.options.routing_rules import WEIGHT_NORMS  # re-exported by ops

# --- standalone: the routing the HF model file carries (tools/sync_standalone.py) ---


@dataclass(frozen=True)
class NullExpertRouting:
    """Result of :func:`null_expert_topk_routing`.

    probs_TE:        weights of the selected true experts, zero elsewhere.
    routing_map_TE:  bool, True where a true expert is selected; a row has 0..K entries.
    routing_map_TX:  bool, the full selection over all X experts; every row has exactly K entries.
    identity_weight_T: weight of the identity path per token (see module docstring).
    """

    probs_TE: torch.Tensor
    routing_map_TE: torch.Tensor
    routing_map_TX: torch.Tensor
    identity_weight_T: torch.Tensor


def null_expert_topk_routing(
    logits_TX: torch.Tensor,
    topk: int,
    num_true_experts: int,
    weight_norm: str = "true_experts",
    scaling_factor: Optional[float] = None,
    selection_bias_X: Optional[torch.Tensor] = None,
    topp_threshold: Optional[float] = None,
    cast_after_scaling: bool = False,
    k_T: Optional[torch.Tensor] = None,
) -> NullExpertRouting:
    """Top-k (or top-p) routing over true and null experts.

    ``selection_bias_X`` (the aux-loss-free expert bias and the target-load controller's null
    bias) is added to the logits to choose the experts only: the weights, the identity weight and
    everything downstream use the unbiased probabilities p = softmax(logits).

    ``topp_threshold`` p: each token takes the smallest set of experts, in order of the selection
    distribution q = softmax(logits + bias), whose q-mass reaches p, at most ``topk`` of them
    (paper appendix C); null picks are dropped as in top-k, and the weights are normalised over
    the chosen experts only.

    ``k_T`` (Ada-K's per-token expert count, 1..``topk``): each token keeps only its first k_T
    picks (in selection order), as a top-``k_T`` router would, with the weights normalised over
    those; with top-p, whichever ends first.

    With no null experts, no bias and top-k, and weight_norm "true_experts" or "all_selected",
    this performs the same operations, in the same order, as Megatron-Core's
    ``topk_routing_with_score_function`` with a softmax score function and
    ``use_pre_softmax=False``; with "none" it matches ``use_pre_softmax=True``. The outputs are
    then bit-identical. Precision follows the version's order: each softmax is taken in float32;
    by default its result is cast to the logits' dtype at once and scaled in that dtype
    (megatron-core 0.16, 0.17); ``cast_after_scaling`` keeps float32 through the scaling and casts
    last (0.18 on). The two differ only for non-float32 logits with a scaling factor.
    """
    assert logits_TX.dim() == 2, f"expected [T, X] logits, got shape {tuple(logits_TX.shape)}"
    num_tokens, num_experts = logits_TX.shape
    assert 0 < num_true_experts <= num_experts and 0 < topk <= num_experts
    assert weight_norm in WEIGHT_NORMS, weight_norm
    stock = selection_bias_X is None and topp_threshold is None and k_T is None
    used_TK = None  # top-p leaves slots unused; None = all K used

    def softmax(values: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(values, dim=-1, dtype=torch.float32)
        return probs if cast_after_scaling else probs.type_as(logits_TX)

    if weight_norm == "none":
        scores_TX = softmax(logits_TX)
        if stock:
            weights_TK, top_indices_TK = torch.topk(scores_TX, k=topk, dim=1)
        else:
            top_indices_TK, used_TK = _select(
                logits_TX, topk, selection_bias_X, topp_threshold, k_T
            )
            weights_TK = scores_TX.gather(1, top_indices_TK)
            if used_TK is not None:
                weights_TK = weights_TK * used_TK
        is_null_TK = top_indices_TK >= num_true_experts
        identity_weight_T = (weights_TK * is_null_TK).sum(dim=-1)
    else:
        if stock:
            top_logits_TK, top_indices_TK = torch.topk(logits_TX, k=topk, dim=1)
        else:
            top_indices_TK, used_TK = _select(
                logits_TX, topk, selection_bias_X, topp_threshold, k_T
            )
            top_logits_TK = logits_TX.gather(1, top_indices_TK)
            if used_TK is not None:  # unused slots out of every normalisation
                top_logits_TK = top_logits_TK.masked_fill(~used_TK, float("-inf"))
        is_null_TK = top_indices_TK >= num_true_experts
        # Softmax over the K picks = p_i / sum_{j in S} p_j (the partition function cancels).
        selected_TK = softmax(top_logits_TK)
        identity_weight_T = (selected_TK * is_null_TK).sum(dim=-1)
        if weight_norm == "all_selected":
            weights_TK = selected_TK
        else:
            # Softmax over the selected true experts only: nulls masked out of the denominator.
            # A token with only null picks would give softmax(all -inf) = NaN (in the forward and
            # in the gradient): give it finite dummy logits, then zero its weights below.
            dropped_TK = is_null_TK if used_TK is None else is_null_TK | ~used_TK
            all_null_T = dropped_TK.all(dim=-1, keepdim=True)
            masked_TK = top_logits_TK.masked_fill(dropped_TK, float("-inf"))
            masked_TK = torch.where(all_null_T, torch.zeros_like(masked_TK), masked_TK)
            weights_TK = softmax(masked_TK)
    weights_TK = weights_TK.masked_fill(is_null_TK, 0.0)
    if used_TK is not None:
        weights_TK = weights_TK.masked_fill(~used_TK, 0.0)

    if scaling_factor:
        weights_TK = weights_TK * scaling_factor
        identity_weight_T = identity_weight_T * scaling_factor
    weights_TK, identity_weight_T = (
        weights_TK.type_as(logits_TX),
        identity_weight_T.type_as(logits_TX),
    )

    probs_TX = torch.zeros_like(logits_TX).scatter(1, top_indices_TK, weights_TK)
    picked_TK = (
        torch.ones_like(top_indices_TK, dtype=torch.int) if used_TK is None else used_TK.int()
    )
    routing_map_TX = torch.zeros_like(logits_TX).int().scatter(1, top_indices_TK, picked_TK).bool()
    if num_experts == num_true_experts:
        probs_TE, routing_map_TE = probs_TX, routing_map_TX
    else:
        probs_TE = probs_TX[:, :num_true_experts].contiguous()
        routing_map_TE = routing_map_TX[:, :num_true_experts].contiguous()
    return NullExpertRouting(probs_TE, routing_map_TE, routing_map_TX, identity_weight_T)


def _select(
    logits_TX: torch.Tensor,
    topk: int,
    selection_bias_X: Optional[torch.Tensor],
    topp_threshold: Optional[float],
    k_T: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(indices_TK of the K best experts by biased logits, used_TK: the slots in use, the top-p
    prefix and the first k_T, or None when all are)."""
    selection_TX = logits_TX.float()
    if selection_bias_X is not None:
        selection_TX = selection_TX + selection_bias_X.float()
    top_TK, indices_TK = torch.topk(selection_TX, k=topk, dim=1)
    used_TK = None
    if topp_threshold is not None:
        # q-mass of the picks in descending order: a slot is used while the mass before it < p.
        q_TK = torch.exp(top_TK - torch.logsumexp(selection_TX, dim=-1, keepdim=True))
        used_TK = q_TK.cumsum(dim=-1) - q_TK < topp_threshold
    if k_T is not None:
        first_TK = torch.arange(topk, device=logits_TX.device) < k_T.unsqueeze(-1)
        used_TK = first_TK if used_TK is None else used_TK & first_TK
    return indices_TK, used_TK


# --- end standalone ---


@dataclass(frozen=True)
class RoutingStats:
    """Per-layer routing statistics of one forward pass, as local sums (reduce them to average).

    num_tokens:           tokens routed (padding excluded).
    num_true_assignments: sum over tokens of k_eff, the number of true experts a token uses.
    k_eff_histogram_K1:   tokens using 0, 1, ..., K true experts ([K + 1] counts).
    """

    num_tokens: torch.Tensor
    num_true_assignments: torch.Tensor
    k_eff_histogram_K1: torch.Tensor

    @property
    def topk(self) -> int:
        return self.k_eff_histogram_K1.numel() - 1

    @property
    def load(self) -> torch.Tensor:
        """Mean true experts per token (the paper's "load")."""
        return self.num_true_assignments / self.num_tokens.clamp(min=1)

    @property
    def bypass_fraction(self) -> torch.Tensor:
        """Fraction of tokens whose K picks are all null (they skip the routed experts)."""
        return self.k_eff_histogram_K1[0] / self.num_tokens.clamp(min=1)

    @property
    def null_fraction(self) -> torch.Tensor:
        """Fraction of all K-per-token assignments that went to null experts."""
        return 1.0 - self.load / self.topk


def routing_stats(
    routing_map_TE: torch.Tensor, topk: int, valid_T: Optional[torch.Tensor] = None
) -> RoutingStats:
    """Statistics of a true-expert routing map; ``valid_T`` (bool) excludes padding tokens."""
    k_eff_T = routing_map_TE.sum(dim=-1)
    if valid_T is not None:
        k_eff_T = k_eff_T[valid_T]
    histogram_K1 = torch.bincount(k_eff_T, minlength=topk + 1).float()
    num_tokens = torch.tensor(float(k_eff_T.numel()), device=routing_map_TE.device)
    return RoutingStats(num_tokens, k_eff_T.sum().float(), histogram_K1)


def expected_load(topk: int, num_true_experts: int, num_null_experts: int) -> float:
    """Load at perfect balance over all X experts: K * E / (E + Z)."""
    return topk * num_true_experts / (num_true_experts + num_null_experts)


def topk_slots_from_routing_map(
    probs_TE: torch.Tensor, routing_map_TE: torch.Tensor, topk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, E] routing -> K slots per token for index-based dispatchers (DeepEP).

    Upstream takes ``topk(probs, K)`` and marks a slot empty (-1) only under a capacity factor; a
    token with fewer than K true picks would then ship its zero-probability slots. Here a slot is
    empty whenever the routing map does not select it. Returns (probs_TK, indices_TK), -1 = empty.
    """
    # Rank slots by selection, not by probability: a selected expert whose weight underflowed to
    # zero must still be dispatched, and an unselected one never.
    k = min(topk, probs_TE.size(1))
    selected_TK, indices_TK = torch.topk(routing_map_TE.float(), k=k, dim=-1)
    selected_TK = selected_TK.bool()
    probs_TK = torch.gather(probs_TE, 1, indices_TK).masked_fill(~selected_TK, 0.0)
    indices_TK = indices_TK.masked_fill(~selected_TK, -1)
    return probs_TK, indices_TK
