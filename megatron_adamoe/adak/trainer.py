"""PPO for Ada-K's allocators on a frozen model (arXiv 2410.10456, section 3.3).

Per batch: the model's own top-k routing gives the baseline reward, a rollout with k sampled
from the allocators gives the reward and the acting policy's log-probabilities, and
``ppo_epochs`` updates follow on the rollout's states (the model is frozen, so each layer's
input for the same actions is the rollout's: the allocators, linear heads, are re-evaluated on
the kept states without running the model again). The loss is the clipped surrogate plus lambda
times the mean expected k (Eq. 11). Rewards: log p(next token) per labelled position; each such
position is one episode through the MoE layers.

Shape legend: B batch, S sequence, T = B x S positions, L MoE layers, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_adamoe.adak.allocator import expected_k, log_prob
from megatron_adamoe.adak.model import AdaK
from megatron_adamoe.adak.ppo import clip_fraction, clipped_surrogate_loss, layer_advantages
from megatron_adamoe.errors import OptionError


@dataclass(frozen=True)
class AdaKOptions:
    """``lam``: the compute penalty (the paper: 3e-3 for every model); ``clip``: PPO's epsilon
    (the paper does not give it; PPO's usual 0.2); ``gamma``: the discount over layers (not
    given either; 1.0: every layer's action is judged by the final reward alike);
    ``ppo_epochs``: updates per rollout (the paper: 2); AdamW at ``lr`` (1e-3) and
    ``weight_decay`` (0.1) as the paper's."""

    lam: float = 3e-3
    clip: float = 0.2
    gamma: float = 1.0
    ppo_epochs: int = 2
    lr: float = 1e-3
    weight_decay: float = 0.1

    def __post_init__(self) -> None:
        for name, ok, fix in (
            ("lam", self.lam >= 0, "use 0 (no penalty) or more"),
            ("clip", 0 < self.clip < 1, "e.g. 0.2"),
            ("gamma", 0 < self.gamma <= 1, "e.g. 1.0"),
            ("ppo_epochs", self.ppo_epochs >= 1, "e.g. 2"),
            ("lr", self.lr > 0, "e.g. 1e-3"),
            ("weight_decay", self.weight_decay >= 0, "e.g. 0.1"),
        ):
            if not ok:
                raise OptionError(f"adak {name} ({getattr(self, name)!r}) is invalid; {fix}")


@dataclass(frozen=True)
class Rollout:
    states: list[torch.Tensor]  # per layer [T, H]
    k: list[torch.Tensor]  # per layer [T]
    old_log_prob_LT: torch.Tensor
    reward_T: torch.Tensor
    baseline_T: torch.Tensor
    mask_T: torch.Tensor  # positions with a next-token label
    true_experts_LT: torch.Tensor


def token_log_likelihood(logits_BSV: torch.Tensor, labels_BS: torch.Tensor) -> torch.Tensor:
    """[T] log p(label of the next position) at every position (0 where there is none)."""
    shifted_BS = torch.full_like(labels_BS, -100)
    shifted_BS[:, :-1] = labels_BS[:, 1:]
    valid_BS = shifted_BS != -100
    log_probs_BSV = torch.log_softmax(logits_BSV.float(), dim=-1)
    picked_BS = log_probs_BSV.gather(-1, shifted_BS.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked_BS * valid_BS).reshape(-1)


class AdaKTrainer:
    """The allocators of ``adak`` trained by PPO on ``model`` (frozen here)."""

    def __init__(self, model, adak: AdaK, options: AdaKOptions = AdaKOptions(), seed: int = 0):
        self.model, self.adak, self.options = model, adak, options
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.eval()  # no dropout: the rollout's states are the update's
        self.optimizer = torch.optim.AdamW(
            adak.allocators.parameters(), lr=options.lr, weight_decay=options.weight_decay
        )
        self.generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
        adak.generator = self.generator

    @torch.no_grad()
    def rollout(self, input_ids, attention_mask=None, labels=None) -> Rollout:
        labels = input_ids if labels is None else labels
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        mask_T = (shifted != -100).reshape(-1)
        self.adak.set_mode("topk")
        baseline_T = token_log_likelihood(
            self.model(input_ids=input_ids, attention_mask=attention_mask).logits, labels
        )
        self.adak.set_mode("sample")
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        steps = list(self.adak.steps)
        self.adak.set_mode("argmax")
        return Rollout(
            states=[s.state_TH for s in steps],
            k=[s.k_T for s in steps],
            old_log_prob_LT=torch.stack([s.log_prob_T for s in steps]),
            reward_T=token_log_likelihood(logits, labels),
            baseline_T=baseline_T,
            mask_T=mask_T,
            true_experts_LT=torch.stack([s.true_experts_T.float() for s in steps]),
        )

    def update(self, rollout: Rollout) -> dict:
        """``ppo_epochs`` steps of the clipped surrogate + lambda x expected k on the rollout."""
        options, mask_T = self.options, rollout.mask_T
        advantage_LT = layer_advantages(
            rollout.reward_T, rollout.baseline_T, len(rollout.k), options.gamma
        )[:, mask_T]
        old_LT = rollout.old_log_prob_LT[:, mask_T]
        for _ in range(options.ppo_epochs):
            logits = [a(s) for a, s in zip(self.adak.allocators, rollout.states)]
            new_LT = torch.stack([log_prob(lg, k) for lg, k in zip(logits, rollout.k)])[:, mask_T]
            surrogate = clipped_surrogate_loss(new_LT, old_LT, advantage_LT, options.clip)
            penalty = torch.stack([expected_k(lg)[mask_T].mean() for lg in logits]).mean()
            loss = surrogate + options.lam * penalty
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        chosen_LT = torch.stack([k.float() for k in rollout.k])[:, mask_T]
        return {
            "loss": float(loss.detach()),
            "surrogate": float(surrogate.detach()),
            "expected_k": float(penalty.detach()),
            "reward": float(rollout.reward_T[mask_T].mean()),
            "reward_topk": float(rollout.baseline_T[mask_T].mean()),
            "k": [round(float(v), 4) for v in chosen_LT.mean(dim=-1)],
            "true_experts": [
                round(float(v), 4) for v in rollout.true_experts_LT[:, mask_T].mean(dim=-1)
            ],
            "clip_fraction": clip_fraction(new_LT.detach(), old_LT, options.clip),
        }

    def train_step(self, input_ids, attention_mask=None, labels=None) -> dict:
        return self.update(self.rollout(input_ids, attention_mask, labels))


def mean_k(adak: AdaK, model, input_ids, attention_mask=None) -> Optional[list[float]]:
    """Mean chosen k per layer at inference (argmax) over the given batch."""
    adak.set_mode("argmax")
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    return [float(step.k_T.float().mean()) for step in adak.steps]
