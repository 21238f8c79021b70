"""Training guards (messages pinned): a non-finite loss, a loss spike over the recent mean, a
collapsed router; the last checkpoint is never replaced by the state that tripped them."""

from __future__ import annotations

import pytest

from megatron_adamoe.errors import TrainingHalted, error_line, report
from megatron_adamoe.training.guards import TrainingGuard


def _halt(guard, iteration, loss, loads=None) -> str:
    with pytest.raises(TrainingHalted) as info:
        guard.check(iteration, loss, loads or {0: 1.5})
    return str(info.value)


def test_non_finite_loss_names_its_iteration():
    guard = TrainingGuard(3.0, 4, 0.01)
    assert _halt(guard, 17, float("nan")) == (
        "training loss is nan at iteration 17; not saved: the last checkpoint is intact; lower "
        "lr or check the data"
    )


def test_spike_is_judged_against_the_recent_mean_once_the_window_is_full():
    guard = TrainingGuard(3.0, 4, 0.0)
    for iteration, loss in enumerate([8.0, 20.0, 5.0, 4.0], 1):  # window filling: no check
        guard.check(iteration, loss, {})
    guard.check(5, 27.0, {})  # mean of (8, 20, 5, 4) = 9.25; 27 < 27.75
    assert _halt(guard, 6, 50.0) == (
        "training loss spiked to 50 at iteration 6, over adamoe_loss_spike_factor (3) x the mean "
        "of the previous 4 (14); not saved: the last checkpoint is intact; lower lr, or raise "
        "the factor (0 turns the guard off)"
    )
    TrainingGuard(0.0, 2, 0.0).check(3, 1e9, {})  # off


def test_collapsed_router_names_the_layer():
    guard = TrainingGuard(0.0, 20, 0.01)
    guard.check(1, 5.0, {0: 1.2, 3: 0.011})
    assert _halt(guard, 2, 5.0, {0: 1.2, 3: 0.0}) == (
        "MoE layer 3 collapsed at iteration 2: load 0.0000 true experts per token is under "
        "adamoe_min_load (0.01), nearly every token routes to null experts; not saved: the last "
        "checkpoint is intact; lower lr, raise the load-balancing coefficient, or set "
        "adamoe_min_load 0"
    )


def test_halts_exit_with_status_3_and_one_line(capsys):
    assert report(TrainingHalted("x"), rank=1, world_size=2) == 3
    assert capsys.readouterr().err == "[rank 1] error: x\n"
    assert error_line(ValueError("a\nb")) == "error: a b"
