"""adamoe-finetune's flags: each bad value is one line naming the flag, its value and the fix;
the deepspeed launcher's --local_rank is accepted."""

from __future__ import annotations

import pytest

from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.finetune import build_parser, check


def _options(tmp_path, *extra):
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
    return build_parser().parse_args(
        ["--model", str(model), "--data", "x.jsonl", "--output-dir", str(tmp_path / "out"), *extra]
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--max-steps", "0"], "max_steps (0) must be >= 1; pass a positive --max-steps"),
        (
            ["--learning-rate", "0"],
            "learning_rate (0.0) must be > 0; pass a positive --learning-rate",
        ),
        (
            ["--load-controller-rate", "-1"],
            "load_controller_rate (-1.0) must be > 0; pass a positive --load-controller-rate",
        ),
        (
            ["--aux-loss-coef", "-0.1"],
            "aux_loss_coef (-0.1) must be >= 0; use 0 to turn the load-balancing loss off",
        ),
    ],
)
def test_bad_values_are_one_line(tmp_path, extra, message):
    with pytest.raises(OptionError) as error:
        check(_options(tmp_path, *extra))
    assert str(error.value) == message


def test_the_deepspeed_launchers_local_rank_is_accepted(tmp_path):
    options = _options(tmp_path, "--local_rank=1")
    check(options)
    assert options.local_rank == 1
