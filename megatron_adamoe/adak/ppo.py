"""Ada-K's training objective (arXiv 2410.10456, section 3.3): PPO's clipped surrogate with
REINFORCE-with-baseline advantages, plus lambda times the expected number of experts.

Pure torch. Each token is an episode through the L MoE layers; layer l's allocator acts (picks
k), and the only reward comes after the last layer: the log-likelihood of the token's next token
under the model routed that way (Eq. 6). The baseline is the same reward under the model's own
top-k routing, so the advantage of layer l is gamma^(L - l) (R - R_topk) (Eq. 9); no critic.

Shape legend:
    L  MoE layers (allocators)
    T  tokens (episodes)
    C  choices of k
"""

from __future__ import annotations

import torch


def layer_advantages(
    reward_T: torch.Tensor, baseline_T: torch.Tensor, num_layers: int, gamma: float
) -> torch.Tensor:
    """[L, T] advantages: gamma^(L - l) (R - R_topk) for layers l = 1..L."""
    powers_L = torch.arange(num_layers - 1, -1, -1, device=reward_T.device, dtype=torch.float32)
    return (gamma**powers_L).unsqueeze(-1) * (reward_T - baseline_T).float().unsqueeze(0)


def clipped_surrogate_loss(
    log_prob_LT: torch.Tensor,
    old_log_prob_LT: torch.Tensor,
    advantage_LT: torch.Tensor,
    clip: float,
) -> torch.Tensor:
    """-mean over layers and tokens of min(r A, clip(r, 1 - eps, 1 + eps) A), with r the ratio
    of the current to the acting policy's probability of the action taken (Eq. 7-8)."""
    ratio_LT = torch.exp(log_prob_LT - old_log_prob_LT)
    clipped_LT = ratio_LT.clamp(1.0 - clip, 1.0 + clip)
    return -torch.minimum(ratio_LT * advantage_LT, clipped_LT * advantage_LT).mean()


def clip_fraction(log_prob_LT: torch.Tensor, old_log_prob_LT: torch.Tensor, clip: float) -> float:
    """Share of (layer, token) pairs whose ratio is outside [1 - eps, 1 + eps]."""
    ratio_LT = torch.exp(log_prob_LT - old_log_prob_LT)
    return float(((ratio_LT - 1.0).abs() > clip).float().mean())
