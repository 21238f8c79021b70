"""The layer benchmark's option checks, in this process (GPU options are checked on CPU too)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[2] / "tools" / "bench_moe_layer.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_moe_layer", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--num-experts", "3"], "--num-experts (3) must be even for EP = 2; or --skip-ep"),
        (["--te"], "--te (requested) must come with --device cuda; Transformer Engine is GPU only"),
        (
            ["--fp8-recipe", "delayed"],
            "--fp8-recipe (delayed) must come with --te; FP8 GEMMs are TE's",
        ),
    ],
)
def test_bench_rejects_bad_options_with_one_line(bench, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        bench.parse_args(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f"error: {message}")
