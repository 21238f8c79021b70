"""The target-load controller's math: how far the null bias must move for a batch to reach the
target load, found from the batch itself, so no rate has to suit the model's logit scale.

Pure torch: no Megatron, no torch.distributed. During each forward pass the router counts the
true picks its tokens would make with the null bias moved by each of ``PROBE_OFFSETS`` (0 and
+-2^j for j = -8..4: a ladder wide enough for the logits of a fresh router, ~0.1, and of a
trained one, ~10); after the global batch the counts are summed over ranks and
:func:`null_bias_step` returns the move that puts the batch's load on the target (linear between
the two probes around it). A controller that solves for the batch's bias cannot overshoot the
way a fixed gain on a small-logit router does, and it settles from the first step.

Shape legend:
    T  tokens
    E  true experts
    X  all experts, true then null
    K  top-k picks per token
    P  probe offsets of the null bias
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_adamoe.ops.routing import _select

PROBE_OFFSETS = (0.0,) + tuple(s * 2.0**j for j in range(-8, 5) for s in (-1.0, 1.0))


def probe_offsets_P(device=None) -> torch.Tensor:
    """The probe offsets in ascending order ([P], float32)."""
    return torch.tensor(sorted(PROBE_OFFSETS), dtype=torch.float32, device=device)


@torch.no_grad()
def true_picks_at_offsets(
    logits_TX: torch.Tensor,
    topk: int,
    num_true: int,
    offsets_P: torch.Tensor,
    selection_bias_X: Optional[torch.Tensor] = None,
    topp_threshold: Optional[float] = None,
) -> torch.Tensor:
    """[P] true picks summed over the tokens when every null expert's selection bias is moved by
    each offset (the routing's own selection: top-k, or top-p, over the biased logits)."""
    num_tokens, num_all = logits_TX.shape
    selection_TX = logits_TX.float()
    if selection_bias_X is not None:
        selection_TX = selection_TX + selection_bias_X.float()
    is_null_X = torch.arange(num_all, device=logits_TX.device) >= num_true
    shifted_PTX = selection_TX + offsets_P.float()[:, None, None] * is_null_X
    indices_TK, used_TK = _select(shifted_PTX.reshape(-1, num_all), topk, None, topp_threshold)
    true_TK = indices_TK < num_true
    if used_TK is not None:
        true_TK = true_TK & used_TK
    return true_TK.reshape(offsets_P.numel(), -1).sum(dim=-1).float()


def null_bias_step(loads_P: list[float], offsets_P: list[float], target: float) -> float:
    """The null-bias move that gives ``target`` load, from the loads measured at ascending
    offsets (non-increasing: a larger null bias picks nulls more often): linear between the two
    probes that bracket the target, the smallest move where a run of probes sits on it, and the
    farthest probe toward the target where none reaches it."""
    if target > loads_P[0]:
        return offsets_P[0]
    if target < loads_P[-1]:
        return offsets_P[-1]
    moves = []
    for (o0, l0), (o1, l1) in zip(zip(offsets_P, loads_P), zip(offsets_P[1:], loads_P[1:])):
        if not min(l0, l1) <= target <= max(l0, l1):
            continue
        if l0 == l1:  # the whole segment gives the target: its point nearest no move
            moves.append(min(max(0.0, o0), o1))
        else:
            moves.append(o0 + (l0 - target) / (l0 - l1) * (o1 - o0))
    return min(moves, key=abs)
