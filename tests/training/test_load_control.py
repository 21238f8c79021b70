"""Compute as a setting, through the entry point (2 gloo processes): the target-load controller
holds the measured load at the target (below and above the balanced load) and its bias
settles; the bias is the same under EP2 x DP, TP2 + SP and PP2 (checked on every rank at every
step) and equal to the one-process run's; resume reproduces loss and bias curves bit for bit."""

from __future__ import annotations

from statistics import fmean

import pytest

from tests.runs import read_metrics, run_pretrain

pytestmark = pytest.mark.distributed

CONTROL = [
    "--moe-aux-loss-coeff",
    "0.01",
    "--adamoe-aux-loss-coeff-schedule",
    "null",
    "--lr",
    "3e-3",
    "--lr-warmup-iters",
    "5",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
    "--save",
    "null",
]


def _train(corpus, tmp_path, name, *extra, iters=150, nproc=2):
    metrics = tmp_path / f"{name}.jsonl"
    run_pretrain(
        corpus,
        "--train-iters",
        str(iters),
        *CONTROL,
        "--adamoe-metrics-file",
        str(metrics),
        *extra,
        nproc=nproc,
    )
    return [r for r in read_metrics(metrics) if "lm loss" in r]


# The default controller has no rate to fit: the same settings settle the test tier's 2-layer
# model and the study's 4-layer model (configs/study/cpu_shakespeare.yaml: hidden 128, experts of
# FFN 256), below and above the balanced load k n / (n + m) = 1.5.
MODELS = {
    "2-layer": [],
    "4-layer": ["--num-layers", "4", "--hidden-size", "128", "--moe-ffn-hidden-size", "256"],
}


@pytest.mark.parametrize(("model", "target"), [("2-layer", 1.0), ("4-layer", 2.0)])
def test_controller_holds_the_target_load_and_its_bias_settles(
    synthetic_corpus, tmp_path, model, target
):
    # The collapse guard is on (a layer under load 0.4 for 3 steps stops the run): an
    # overshoot early on would end it.
    guard = ["--adamoe-min-load", "0.4", "--adamoe-min-load-steps", "3"]
    records = _train(
        synthetic_corpus,
        tmp_path,
        model,
        "--adamoe-target-load",
        str(target),
        *MODELS[model],
        *guard,
    )
    layers = len(records[0]["load"])
    assert layers == (4 if model == "4-layer" else 2)
    tail = records[-30:]
    per_layer = [fmean(r["load"][layer] for r in tail) for layer in range(layers)]
    assert per_layer == [pytest.approx(target, rel=0.05)] * layers
    # From the first steps: steps 5-30 average within 10 % of the target in every layer (one
    # step's load still varies with its batch: 512 tokens).
    early = [r["load"] for r in records if 5 <= r["iteration"] <= 30]
    assert len(early) == 26
    for layer in range(layers):
        assert fmean(row[layer] for row in early) == pytest.approx(target, rel=0.1), layer
    # The bias settles, it does not wind up: its mean over the last 30 steps is within 0.15 of
    # the 30 before, and it stays small against the router's logits.
    bias = [r["null bias"] for r in records]
    for layer in range(layers):
        late = fmean(b[layer] for b in bias[-30:])
        before = fmean(b[layer] for b in bias[-60:-30])
        assert abs(late - before) < 0.15 and abs(late) < 2.0, (layer, before, late)


def test_bias_is_the_same_on_every_rank_under_each_layout(synthetic_corpus, tmp_path):
    """Each run checks at every step that all ranks of a stage hold the same biases (an
    all-reduce of min and max; it stops otherwise): EP2 x DP2, TP2 + SP and PP2 all train
    through. TP2 + SP initialises as one process does, so its biases also follow the
    one-process run's; EP2 and PP2 initialise experts and stages from other random streams
    (as Megatron does), so only their first update, from the same router, can be compared."""
    common = ["--adamoe-target-load", "1.0", "--expert-model-parallel-size", "1"]
    single = _train(synthetic_corpus, tmp_path, "tp1", *common, iters=10, nproc=1)
    flat = [bias for r in single for bias in r["null bias"]]  # step-major, then layer
    for name, layout in {
        "ep2": ["--expert-model-parallel-size", "2"],
        "tp2": ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
        "pp2": ["--pipeline-model-parallel-size", "2"],
    }.items():
        records = _train(synthetic_corpus, tmp_path, name, *common, *layout, iters=10)
        got = [bias for r in records for bias in r["null bias"]]
        assert len(got) == len(flat) and any(got), name
        compared = flat if name == "tp2" else flat[:3]  # step 1 (both layers), step 2 layer 0
        assert got[: len(compared)] == pytest.approx(compared, rel=1e-4, abs=1e-6), name


def test_resume_reproduces_loss_and_bias_bit_for_bit(synthetic_corpus, tmp_path):
    options = ["--adamoe-target-load", "1.0", "--train-iters", "12", "--hidden-dropout", "0.1"]
    whole = tmp_path / "whole.jsonl"
    run_pretrain(
        synthetic_corpus,
        *options,
        "--save",
        str(tmp_path / "a"),
        "--adamoe-metrics-file",
        str(whole),
    )
    split = tmp_path / "split.jsonl"
    for extra in (["--exit-interval", "6"], []):
        run_pretrain(
            synthetic_corpus,
            *options,
            *extra,
            "--save",
            str(tmp_path / "b"),
            "--adamoe-metrics-file",
            str(split),
        )
    pick = [
        (r["iteration"], r["lm loss"], r["null bias"])
        for r in read_metrics(whole)
        if "lm loss" in r
    ]
    got = [
        (r["iteration"], r["lm loss"], r["null bias"])
        for r in read_metrics(split)
        if "lm loss" in r
    ]
    assert got == pick and len(got) == 12
