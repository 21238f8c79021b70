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


def test_spike_is_judged_against_the_recent_mean():
    guard = TrainingGuard(3.0, 4, 0.0)
    for iteration, loss in enumerate([8.0, 20.0, 5.0, 4.0], 1):  # 20 < 3 x 8: no spike
        guard.check(iteration, loss, {})
    guard.check(5, 27.0, {})  # mean of (8, 20, 5, 4) = 9.25; 27 < 27.75
    assert _halt(guard, 6, 50.0) == (
        "training loss spiked to 50 at iteration 6, over adamoe_loss_spike_factor (3) x the mean "
        "of the previous 4 (14); not saved: the last checkpoint is intact; lower lr, or raise "
        "the factor (0 turns the guard off)"
    )
    TrainingGuard(0.0, 2, 0.0).check(3, 1e9, {})  # off


def test_a_spike_before_the_window_fills_is_caught_and_so_is_the_first_step():
    """The probe that used to pass unnoticed: the loss jumps at step 2 (x 10^6), long before
    the window of 20 is full; and at step 1, against ln(vocabulary size)."""
    guard = TrainingGuard(3.0, 20, 0.0, vocab_size=256)
    guard.check(1, 5.6, {})
    assert _halt(guard, 2, 5.6e6) == (
        "training loss spiked to 5.6e+06 at iteration 2, over adamoe_loss_spike_factor (3) x the "
        "mean of the previous 1 (5.6); not saved: the last checkpoint is intact; lower lr, or "
        "raise the factor (0 turns the guard off)"
    )
    assert _halt(TrainingGuard(3.0, 20, 0.0, vocab_size=256), 1, 17.0) == (
        "training loss spiked to 17 at iteration 1, over adamoe_loss_spike_factor (3) x "
        "ln(vocabulary size), a uniform prediction's loss (5.545); not saved: the last "
        "checkpoint is intact; lower lr, or raise the factor (0 turns the guard off)"
    )
    TrainingGuard(3.0, 20, 0.0, vocab_size=256).check(1, 16.0, {})  # 16 < 3 ln 256 = 16.6


def test_a_run_of_zero_gradient_norms_stops_a_dead_model():
    guard = TrainingGuard(3.0, 20, 0.0, vocab_size=256, dead_grad_steps=3)
    guard.check(1, 5.5, {}, grad_norm=0.0)
    guard.check(2, 5.5, {}, grad_norm=0.4)  # the count starts again
    guard.check(3, 5.5, {}, grad_norm=0.0)
    guard.check(4, 5.5, {}, grad_norm=0.0)
    guard.check(5, 5.5, {})  # no norm (a skipped update): neither counted nor a reset
    with pytest.raises(TrainingHalted) as info:
        guard.check(6, 5.5, {}, grad_norm=0.0)
    assert str(info.value) == (
        "gradient norm is 0 at iteration 6, 3 steps in a row (adamoe_dead_grad_steps 3): the "
        "model no longer learns; not saved: the last checkpoint is intact; lower lr and restart "
        "from it, or set adamoe_dead_grad_steps 0"
    )
    TrainingGuard(3.0, 20, 0.0, dead_grad_steps=0).check(1, 5.5, {}, grad_norm=0.0)  # off


def test_collapsed_router_names_the_layer():
    guard = TrainingGuard(0.0, 20, 0.01)
    guard.check(1, 5.0, {0: 1.2, 3: 0.011})
    assert _halt(guard, 2, 5.0, {0: 1.2, 3: 0.0}) == (
        "MoE layer 3 collapsed at iteration 2: load 0.0000 true experts per token, under "
        "adamoe_min_load (0.01) for 1 step, nearly every token routes to null experts; not "
        "saved: the last checkpoint is intact; lower lr, raise the load-balancing coefficient, "
        "or set adamoe_min_load 0"
    )


def test_a_dip_under_the_floor_holds_saves_back_and_a_stay_stops_the_run():
    """Early in training a layer can dip to load 0 for a step and recover (seen in the CPU
    study, with and without the target-load controller); a collapse stays under the floor."""
    guard = TrainingGuard(0.0, 20, 0.01, min_load_steps=3)
    guard.check(1, 5.0, {0: 1.2, 1: 1.0})
    assert not guard.holding_back
    guard.check(2, 5.0, {0: 1.2, 1: 0.0})  # a dip: no stop, but no save of this state
    assert guard.holding_back
    guard.check(3, 5.0, {0: 1.2, 1: 0.004})
    guard.check(4, 5.0, {0: 1.1, 1: 0.9})  # recovered: the count starts again
    assert not guard.holding_back
    guard.check(5, 5.0, {0: 1.2, 1: 0.0})
    guard.check(6, 5.0, {0: 1.2, 1: 0.0})
    assert (
        "MoE layer 1 collapsed at iteration 7: load 0.0000 true experts per token, under "
        "adamoe_min_load (0.01) for 3 steps" in _halt(guard, 7, 5.0, {0: 1.2, 1: 0.0})
    )


def test_halts_exit_with_status_3_and_one_line(capsys):
    assert report(TrainingHalted("x"), rank=1, world_size=2) == 3
    assert capsys.readouterr().err == "[rank 1] error: x\n"
    assert error_line(ValueError("a\nb")) == "error: a b"
