"""Ada-K's allocator (Yue et al., ICLR 2025, arXiv 2410.10456, Eq. 4-5): per MoE layer, a
bias-free linear map of the layer's input hidden state to a categorical distribution over the
number of experts k = 1..C the token takes from the frozen router's ranking.

Pure torch. Shape legend:
    T  tokens
    H  hidden size
    C  choices of k: k = 1..C (the paper: 1..N, every routed expert)
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class KAllocator(nn.Module):
    """One MoE layer's allocator. Initialised at zero: every k equally likely (the paper's
    "random" start; its warm starts only move where PPO begins)."""

    def __init__(self, hidden_size: int, max_k: int) -> None:
        super().__init__()
        self.max_k = max_k
        self.proj = nn.Linear(hidden_size, max_k, bias=False)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x_TH: torch.Tensor) -> torch.Tensor:
        """[T, C] logits over k = 1..C, in float32."""
        return self.proj(x_TH.to(self.proj.weight.dtype)).float()


def choose_k(
    logits_TC: torch.Tensor,
    sample: bool,
    generator: Optional[torch.Generator] = None,
    uniform_T: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """[T] k in 1..C: drawn from the distribution (training, Eq. 5) or its most likely value.
    ``uniform_T``: the draw's uniform numbers in [0, 1) (inverse CDF), so that a token's draw
    depends on its own number only, whatever the batch it is in."""
    if not sample:
        return logits_TC.argmax(dim=-1) + 1
    probs_TC = torch.softmax(logits_TC.detach(), dim=-1)
    if uniform_T is None:
        return torch.multinomial(probs_TC, 1, generator=generator).squeeze(-1) + 1
    below_TC = probs_TC.cumsum(dim=-1) <= uniform_T.unsqueeze(-1).to(probs_TC.dtype)
    return below_TC.sum(dim=-1).clamp(max=logits_TC.size(-1) - 1) + 1


def log_prob(logits_TC: torch.Tensor, k_T: torch.Tensor) -> torch.Tensor:
    """[T] log pi(k_T | state) of the chosen counts."""
    return torch.log_softmax(logits_TC, dim=-1).gather(1, (k_T - 1).unsqueeze(-1)).squeeze(-1)


def expected_k(logits_TC: torch.Tensor) -> torch.Tensor:
    """[T] sum_n n * pi(n | state): the differentiable compute the paper's L_reg (Eq. 10)
    penalises."""
    counts_C = torch.arange(1, logits_TC.size(-1) + 1, device=logits_TC.device, dtype=torch.float32)
    return torch.softmax(logits_TC, dim=-1) @ counts_C
