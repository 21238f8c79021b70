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
from megatron_adamoe.adak.ppo import clipped_surrogate_loss, layer_advantages
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


class AllocatorHeads(torch.nn.Module):
    """The allocators as one module for a data-parallel wrapper (DDP, a DeepSpeed engine):
    forward(states) -> one [T, C] logits tensor per layer."""

    def __init__(self, allocators: torch.nn.ModuleList) -> None:
        super().__init__()
        self.allocators = allocators

    def forward(self, states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [allocator(state) for allocator, state in zip(self.allocators, states)]


def _all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values


class AdaKTrainer:
    """The allocators of ``adak`` trained by PPO on ``model`` (frozen here).

    One process by default (AdamW here). Data-parallel: ``heads`` is the ranks' shared
    ``AllocatorHeads`` (DDP-wrapped, or a DeepSpeed engine, which then also steps), each rank
    passes its rows of the global batch with ``rows`` (their indices in it) and ``global_rows``;
    losses are scaled so the averaged gradient is the global batch's, and each token's k is drawn
    from uniform numbers of the global batch, so the run equals one process with that batch."""

    def __init__(
        self,
        model,
        adak: AdaK,
        options: AdaKOptions = AdaKOptions(),
        seed: int = 0,
        heads=None,
        optimizer=None,
    ):
        self.model, self.adak, self.options, self.seed = model, adak, options, seed
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        model.eval()  # no dropout: the rollout's states are the update's
        self.heads = heads if heads is not None else AllocatorHeads(adak.allocators)
        self.engine = heads if hasattr(heads, "backward") and hasattr(heads, "step") else None
        self.optimizer = optimizer
        if self.optimizer is None and self.engine is None:
            self.optimizer = torch.optim.AdamW(
                adak.allocators.parameters(), lr=options.lr, weight_decay=options.weight_decay
            )
        self.step = 0
        self.world = (
            torch.distributed.get_world_size()
            if torch.distributed.is_available() and torch.distributed.is_initialized()
            else 1
        )

    def _uniform(self, rows, global_rows: int, seq_length: int, device) -> list[torch.Tensor]:
        """Per layer [T] uniform numbers of this rank's rows, drawn for the whole global batch
        from the seed and the step."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step)
        uniform_LBS = torch.rand(
            len(self.adak.allocators), global_rows, seq_length, generator=generator
        )
        return [u[rows].reshape(-1).to(device) for u in uniform_LBS]

    @torch.no_grad()
    def rollout(self, input_ids, attention_mask=None, labels=None, rows=None, global_rows=None):
        labels = input_ids if labels is None else labels
        if attention_mask is not None:
            labels = labels.masked_fill(attention_mask == 0, -100)
        shifted = torch.full_like(labels, -100)
        shifted[:, :-1] = labels[:, 1:]
        mask_T = (shifted != -100).reshape(-1)
        rows = torch.arange(input_ids.size(0)) if rows is None else torch.as_tensor(rows)
        global_rows = input_ids.size(0) if global_rows is None else global_rows
        self.adak.set_mode("topk")
        baseline_T = token_log_likelihood(
            self.model(input_ids=input_ids, attention_mask=attention_mask).logits, labels
        )
        self.adak.set_mode("sample")
        self.adak.uniform = self._uniform(rows, global_rows, input_ids.size(1), input_ids.device)
        try:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        finally:
            self.adak.uniform = None
            self.adak.set_mode("argmax")
        steps = list(self.adak.steps)
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
        """``ppo_epochs`` steps of the clipped surrogate + lambda x expected k on the rollout;
        logs are means over the global batch."""
        options, mask_T = self.options, rollout.mask_T
        local = float(mask_T.sum())
        total = float(_all_reduce_sum(torch.tensor([local], dtype=torch.float64))[0])
        scale = self.world * local / max(total, 1.0)  # local means -> the global batch's mean
        advantage_LT = layer_advantages(
            rollout.reward_T, rollout.baseline_T, len(rollout.k), options.gamma
        )[:, mask_T]
        old_LT = rollout.old_log_prob_LT[:, mask_T]
        for _ in range(options.ppo_epochs):
            logits = self.heads(rollout.states)
            new_LT = torch.stack([log_prob(lg, k) for lg, k in zip(logits, rollout.k)])[:, mask_T]
            surrogate = clipped_surrogate_loss(new_LT, old_LT, advantage_LT, options.clip)
            penalty = torch.stack([expected_k(lg)[mask_T].mean() for lg in logits]).mean()
            loss = scale * (surrogate + options.lam * penalty)
            if self.engine is not None:
                self.engine.backward(loss)
                self.engine.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
        self.step += 1
        return self._logs(rollout, new_LT.detach(), old_LT, surrogate, penalty, loss, local, total)

    def _logs(self, rollout, new_LT, old_LT, surrogate, penalty, loss, local, total) -> dict:
        """Global-batch means: every value summed over ranks with its token count."""
        mask_T = rollout.mask_T
        chosen_LT = torch.stack([k.float() for k in rollout.k])[:, mask_T]
        clipped = float(((torch.exp(new_LT - old_LT) - 1.0).abs() > self.options.clip).sum())
        sums = torch.tensor(
            [
                float(loss.detach()) / self.world * total,
                float(surrogate.detach()) * local,
                float(penalty.detach()) * local,
                float(rollout.reward_T[mask_T].sum()),
                float(rollout.baseline_T[mask_T].sum()),
                clipped,
                *chosen_LT.sum(dim=-1).tolist(),
                *rollout.true_experts_LT[:, mask_T].sum(dim=-1).tolist(),
            ],
            dtype=torch.float64,
        )
        sums = (_all_reduce_sum(sums) / max(total, 1.0)).tolist()
        layers = len(rollout.k)
        return {
            "loss": sums[0],
            "surrogate": sums[1],
            "expected_k": sums[2],
            "reward": sums[3],
            "reward_topk": sums[4],
            "clip_fraction": sums[5] / layers,
            "k": [round(v, 4) for v in sums[6 : 6 + layers]],
            "true_experts": [round(v, 4) for v in sums[6 + layers :]],
        }

    def train_step(self, input_ids, attention_mask=None, labels=None, rows=None, global_rows=None):
        return self.update(self.rollout(input_ids, attention_mask, labels, rows, global_rows))


def mean_k(adak: AdaK, model, input_ids, attention_mask=None) -> Optional[list[float]]:
    """Mean chosen k per layer at inference (argmax) over the given batch."""
    adak.set_mode("argmax")
    with torch.no_grad():
        model(input_ids=input_ids, attention_mask=attention_mask)
    return [float(step.k_T.float().mean()) for step in adak.steps]
