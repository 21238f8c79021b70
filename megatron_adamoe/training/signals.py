"""Megatron-LM's ``exit_signal_handler``: on SIGTERM (what SLURM sends before a time limit, and
what torchrun forwards to its workers when it is stopped) every rank finishes the current step,
the run saves a checkpoint and exits 0, so no iteration since the last save is lost."""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist


class ExitSignalHandler:
    """Remembers that the signal arrived; ``received_anywhere`` asks every rank (one all-reduce
    per step), so all ranks stop after the same step even if only some were signalled."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        self.signum, self.received = signum, False
        self.previous = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = True

    def received_anywhere(self, device) -> bool:
        flag = torch.tensor([int(self.received)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        signal.signal(self.signum, self.previous)
