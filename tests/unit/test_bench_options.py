"""The benchmarks in this process: the layer benchmark's option checks (GPU options are checked
on CPU too), and a tiny run of the HF model benchmark."""

from __future__ import annotations

import pytest

from tests.tools import load_tool


@pytest.fixture(scope="module")
def bench():
    return load_tool("bench_moe_layer")


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


def test_hf_model_benchmark_prints_both_models_and_their_ratios(capsys):
    """A tiny run of tools/bench_hf_model.py (make bench-hf) in this process: one row per
    attention implementation and batch size, AdaMoE and top-k tokens/s, and the time ratios."""
    bench_hf = load_tool("bench_hf_model")
    argv = ["--layers", "1", "--hidden", "32", "--ffn", "32", "--prompt", "8"]
    assert bench_hf.main([*argv, "--new-tokens", "2", "--repeats", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith(("eager", "sdpa"))]
    assert [(row[0], row[1]) for row in rows] == [
        ("eager", "1"),
        ("eager", "8"),
        ("sdpa", "1"),
        ("sdpa", "8"),
    ]
    for row in rows:
        load, flops = float(row[2]), float(row[3])
        assert 0 <= load <= 3 and flops == pytest.approx(load / 2, abs=3e-3)  # both rounded
        assert float(row[-1]) > 0 and float(row[-5]) > 0  # decode and prefill time ratios
    with pytest.raises(SystemExit):
        bench_hf.parse_args(["--baseline-topk", "9"])
