"""Training guards: stop a run whose loss is not finite or spikes, or whose router collapsed,
before that state is saved. Torch-free; the trainer calls ``check`` after every step.

- non-finite loss: always;
- spike: the loss exceeds ``adamoe_loss_spike_factor`` times the mean of the previous
  ``adamoe_loss_spike_window`` losses, from the second step on (the mean of those known until
  the window fills); at the first step, times ln(vocabulary size), the loss of a uniform
  prediction, which an initialised model starts near (factor 0 = off);
- a dead model: the gradient norm is exactly 0 for ``adamoe_dead_grad_steps`` steps in a row
  (what a model that diverged and saturated shows while its loss stays flat; 0 = off);
- collapse: an MoE layer's measured load (true experts per token over the global batch) stays
  below ``adamoe_min_load`` (0 = off) for ``adamoe_min_load_steps`` consecutive steps: every
  token routes (almost) only to null experts. Early in training a layer can dip under the floor
  for a step or two and recover (all tokens still route alike); a collapse stays. While a layer
  is under the floor the guard is ``holding_back`` and the trainer defers periodic saves, so a
  collapsing state never becomes the latest checkpoint.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Optional

from megatron_adamoe.errors import TrainingHalted

NOT_SAVED = "not saved: the last checkpoint is intact"


class TrainingGuard:
    def __init__(
        self,
        spike_factor: float,
        spike_window: int,
        min_load: float,
        min_load_steps: int = 1,
        vocab_size: int = 0,
        dead_grad_steps: int = 0,
    ) -> None:
        self.spike_factor, self.min_load, self.min_load_steps = (
            spike_factor,
            min_load,
            min_load_steps,
        )
        self.uniform_loss = math.log(vocab_size) if vocab_size > 1 else None
        self.dead_grad_steps = dead_grad_steps
        self.recent: deque = deque(maxlen=spike_window)
        self.steps_under: dict[int, int] = {}  # layer -> consecutive steps under the floor
        self.zero_grad_steps = 0

    @property
    def holding_back(self) -> bool:
        """A layer is under the load floor now (not yet for long enough to stop the run)."""
        return any(self.steps_under.values())

    def check(
        self,
        iteration: int,
        loss: float,
        loads: dict[int, float],
        grad_norm: Optional[float] = None,
    ) -> None:
        """Raise TrainingHalted naming the iteration (and the layer) when a guard trips."""
        if not math.isfinite(loss):
            raise TrainingHalted(
                f"training loss is {loss} at iteration {iteration}; {NOT_SAVED}; "
                "lower lr or check the data"
            )
        self._check_spike(iteration, loss)
        self._check_gradient(iteration, grad_norm)
        if self.min_load:
            for layer, load in sorted(loads.items()):
                under = self.steps_under.get(layer, 0) + 1 if load < self.min_load else 0
                self.steps_under[layer] = under
                if under >= self.min_load_steps:
                    raise TrainingHalted(
                        f"MoE layer {layer} collapsed at iteration {iteration}: load {load:.4f} "
                        f"true experts per token, under adamoe_min_load ({self.min_load:g}) for "
                        f"{under} step{'s' if under > 1 else ''}, nearly every token routes to "
                        f"null experts; {NOT_SAVED}; lower lr, raise the load-balancing "
                        "coefficient, or set adamoe_min_load 0"
                    )
        self.recent.append(loss)

    def _check_spike(self, iteration: int, loss: float) -> None:
        if not self.spike_factor:
            return
        if self.recent:
            reference = sum(self.recent) / len(self.recent)
            against = f"the mean of the previous {len(self.recent)} ({reference:.4g})"
        elif self.uniform_loss is not None:
            reference = self.uniform_loss
            against = f"ln(vocabulary size), a uniform prediction's loss ({reference:.4g})"
        else:
            return
        if loss > self.spike_factor * reference:
            raise TrainingHalted(
                f"training loss spiked to {loss:.4g} at iteration {iteration}, over "
                f"adamoe_loss_spike_factor ({self.spike_factor:g}) x {against}; {NOT_SAVED}; "
                "lower lr, or raise the factor (0 turns the guard off)"
            )

    def _check_gradient(self, iteration: int, grad_norm: Optional[float]) -> None:
        if not self.dead_grad_steps or grad_norm is None:
            return
        self.zero_grad_steps = self.zero_grad_steps + 1 if grad_norm == 0 else 0
        if self.zero_grad_steps >= self.dead_grad_steps:
            raise TrainingHalted(
                f"gradient norm is 0 at iteration {iteration}, {self.zero_grad_steps} steps in a "
                f"row (adamoe_dead_grad_steps {self.dead_grad_steps}): the model no longer "
                f"learns; {NOT_SAVED}; lower lr and restart from it, or set "
                "adamoe_dead_grad_steps 0"
            )
