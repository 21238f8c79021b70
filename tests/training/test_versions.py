"""A run moves between the two tested megatron-core versions (0.16.1 on Python 3.11, 0.19.x on
3.12) as users upgrade mid-run: the older writes, the newer resumes with the losses of an
uninterrupted run; the newer's checkpoints are refused by the older in one line. Needs both
environments: ``ADAMOE_OTHER_PYTHON`` names the other one's interpreter (.ci/run sets it)."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.runs import read_metrics, run_pretrain

OTHER_PYTHON = os.environ.get("ADAMOE_OTHER_PYTHON")
pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(
        not OTHER_PYTHON, reason="ADAMOE_OTHER_PYTHON (the other environment) unset"
    ),
]


def _version(python: str) -> tuple[int, ...]:
    text = subprocess.run(
        [python, "-c", "import importlib.metadata as m; print(m.version('megatron-core'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return tuple(int(part) for part in text.split(".")[:3])


def _losses(path) -> dict[int, float]:
    return {r["iteration"]: r["lm loss"] for r in read_metrics(path) if "lm loss" in r}


def test_checkpoints_move_forward_between_megatron_core_versions(synthetic_corpus, tmp_path):
    import sys

    this, other = sys.executable, OTHER_PYTHON
    older, newer = sorted((this, other), key=_version)
    assert _version(older) < _version(newer), "the two environments hold one version"

    def run(python, save, iters, **kwargs):
        metrics = tmp_path / f"{save}.jsonl"
        result = run_pretrain(
            synthetic_corpus,
            "--train-iters",
            str(iters),
            "--save",
            str(tmp_path / save),
            "--save-interval",
            "3",
            "--adamoe-metrics-file",
            str(metrics),
            python=None if python == this else python,
            **kwargs,
        )
        return result, metrics

    _, straight = run(newer, "straight", 6)
    run(older, "upgraded", 3)
    resumed, upgraded = run(newer, "upgraded", 6)
    assert "resuming at iteration 3" in resumed.stdout
    assert _losses(upgraded) == _losses(straight)  # iterations 1-3 older, 4-6 newer

    run(newer, "downgraded", 3)
    refused, _ = run(older, "downgraded", 6, check=False)
    assert refused.returncode != 0
    errors = {line for line in refused.stderr.splitlines() if "] error: " in line}
    checkpoint = tmp_path / "downgraded" / "iter_0000003"
    assert errors and all(
        line.endswith(
            f"error: checkpoint ('{checkpoint}') must be in a format this run reads: a newer "
            "megatron-core (0.19 on) wrote it, with its common state inside the shards, which "
            f"megatron-core {'.'.join(map(str, _version(older)))} cannot read; resume it with "
            "megatron-core 0.19.x (Python 3.12: make install PYTHON=python3.12). Checkpoints go "
            "forward only: 0.19 reads 0.16's"
        )
        for line in errors
    ), refused.stderr[-3000:]
