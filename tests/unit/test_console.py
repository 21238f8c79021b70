"""The first screen: Megatron's known, harmless log lines and warnings are dropped; anything else
from the same loggers still shows."""

from __future__ import annotations

import logging
import warnings

from megatron_adamoe.console import quiet_known_upstream_noise


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_known_log_lines_are_dropped_and_others_kept():
    quiet_known_upstream_noise()
    quiet_known_upstream_noise()  # idempotent: one filter per logger
    collect = _Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    try:
        rng = logging.getLogger("megatron.core.tensor_parallel.random")
        rerun = logging.getLogger("megatron.core.rerun_state_machine")
        rng.warning("CPU RNG state changed within GPU RNG context")
        rerun.warning("Implicit initialization of Rerun State Machine!")
        rerun.warning("RerunStateMachine initialized in mode RerunMode.DISABLED")
        rng.warning("cuda rng state model-parallel-rng is not added")  # unexpected: shown
        rerun.warning("a result differs on rerun")
    finally:
        root.removeHandler(collect)
    assert collect.lines == [
        "cuda rng state model-parallel-rng is not added",
        "a result differs on rerun",
    ]
    assert len(rng.filters) == 1


def test_known_warnings_are_ignored_and_others_shown():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_upstream_noise()
        warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
        warnings.warn("something new upstream", UserWarning)
    assert [str(w.message) for w in caught] == ["something new upstream"]


def test_accelerates_accumulation_notice_is_dropped_only_when_it_agrees_with_the_run():
    """Under DeepSpeed the HF Trainer hands accelerate 1 and accumulates itself, and accelerate
    then calls any N > 1 a mismatch; the line goes when N is the run's own value."""
    from accelerate import PartialState
    from accelerate.logging import get_logger

    from megatron_adamoe.console import quiet_fine_tuning_noise

    quiet_fine_tuning_noise(4)
    PartialState(cpu=True)  # one process, as the Trainer starts it
    collect = _Collect()
    accelerate = logging.getLogger("accelerate.accelerator")
    accelerate.addHandler(collect)
    try:
        logger = get_logger("accelerate.accelerator")  # accelerate's own adapter ("[RANK 0] ")
        for steps in (4, 3):
            logger.warning(
                f"Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1, "
                f"DeepSpeed config has {steps}. Using DeepSpeed's value.",
                main_process_only=False,
            )
    finally:
        accelerate.removeHandler(collect)
        PartialState._reset_state()  # the Trainers of later tests start their own
    assert len(collect.lines) == 1 and "DeepSpeed config has 3." in collect.lines[0]
