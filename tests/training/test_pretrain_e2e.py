"""Pretraining end to end: resume bit for bit, EP = 2 -> EP = 1 resharding, a save killed
midway, TensorBoard metrics, one-line errors from the launch script."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.runs import REPO, read_metrics, run_pretrain

pytestmark = pytest.mark.distributed

TRAIN = ["--train-iters", "12", "--eval-interval", "6"]


def _train_losses(records):
    return [(r["iteration"], r["lm loss"]) for r in records if "lm loss" in r]


def _validation(records):
    return [(r["iteration"], r["validation lm loss"]) for r in records if "validation lm loss" in r]


def test_resume_equals_uninterrupted_run_bit_for_bit(synthetic_corpus, tmp_path):
    """6 steps, save, resume, 6 more == 12 uninterrupted steps (dropout on: RNG restored)."""
    whole = tmp_path / "whole.jsonl"
    run_pretrain(
        synthetic_corpus,
        *TRAIN,
        "--save",
        str(tmp_path / "a"),
        "--adamoe-metrics-file",
        str(whole),
        "--tensorboard-dir",
        str(tmp_path / "tb"),
    )
    split = tmp_path / "split.jsonl"
    first = run_pretrain(
        synthetic_corpus,
        *TRAIN,
        "--exit-interval",
        "6",
        "--save",
        str(tmp_path / "b"),
        "--adamoe-metrics-file",
        str(split),
    )
    assert (tmp_path / "b" / "iter_0000006").is_dir()
    resolved = yaml.safe_load((tmp_path / "b" / "iter_0000006" / "config.yaml").read_text())
    assert resolved["exit_interval"] == 6 and resolved["adamoe_num_null_experts"] == 4
    second = run_pretrain(
        synthetic_corpus, *TRAIN, "--save", str(tmp_path / "b"), "--adamoe-metrics-file", str(split)
    )
    assert "resuming at iteration 6" in second.stdout
    assert "resuming" not in first.stdout
    expected, got = read_metrics(whole), read_metrics(split)
    assert [r["iteration"] for r in got if "lm loss" in r] == list(range(1, 13))
    assert _train_losses(got) == _train_losses(expected)  # exact float equality
    assert _validation(got) == _validation(expected)
    assert [r["load"] for r in got if "load" in r] == [r["load"] for r in expected if "load" in r]
    # The loss falls, and the per-layer load and FLOPs ratio come from the measured routing.
    losses = [loss for _, loss in _train_losses(expected)]
    assert losses[-1] < losses[0]
    last = [r for r in expected if "lm loss" in r][-1]
    assert len(last["load"]) == 2 and all(
        load is not None and 0 <= load <= 3 for load in last["load"]
    )
    assert 0 < last["flops vs topk"] < 1.5
    _check_tensorboard(tmp_path / "tb")


def _check_tensorboard(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in (
        "lm loss",
        "learning-rate",
        "adamoe/load",
        "adamoe/bypass_fraction",
        "adamoe/null_fraction",
        "load_balancing_loss",
        "adamoe/flops_vs_topk",
        "moe/adamoe/load_layer_0",
        "moe/adamoe/load_layer_1",
        "lm loss validation",
    ):
        assert tag in tags, f"{tag} missing from {sorted(tags)}"
    assert len(events.Scalars("lm loss")) == 12


def test_ep2_checkpoint_loads_into_ep1_with_the_same_validation_loss(synthetic_corpus, tmp_path):
    ep2 = tmp_path / "ep2.jsonl"
    run_pretrain(
        synthetic_corpus,
        *TRAIN,
        "--train-iters",
        "6",
        "--save",
        str(tmp_path / "ckpt"),
        "--adamoe-metrics-file",
        str(ep2),
    )
    saved_loss = _validation(read_metrics(ep2))[-1]
    for nproc in (1, 2):  # EP = 1 on one process, and EP = 1 with DP = 2
        ep1 = tmp_path / f"ep1_{nproc}.jsonl"
        result = run_pretrain(
            synthetic_corpus,
            *TRAIN,
            "--train-iters",
            "6",
            "--load",
            str(tmp_path / "ckpt"),
            "--expert-model-parallel-size",
            "1",
            "--skip-train",
            "--save",
            "null",
            "--adamoe-metrics-file",
            str(ep1),
            nproc=nproc,
        )
        assert "model weights resharded" in result.stdout + result.stderr
        assert _validation(read_metrics(ep1)) == [saved_loss]
    # And training goes on at EP = 1 from the EP = 2 checkpoint.
    resumed = tmp_path / "resumed.jsonl"
    run_pretrain(
        synthetic_corpus,
        *TRAIN,
        "--train-iters",
        "8",
        "--load",
        str(tmp_path / "ckpt"),
        "--save",
        str(tmp_path / "ep1_ckpt"),
        "--expert-model-parallel-size",
        "1",
        "--adamoe-metrics-file",
        str(resumed),
        nproc=1,
    )
    assert [i for i, _ in _train_losses(read_metrics(resumed))] == [7, 8]
    # Restarted with the same options, it continues from its own save, not from load again.
    again = run_pretrain(
        synthetic_corpus,
        *TRAIN,
        "--train-iters",
        "10",
        "--load",
        str(tmp_path / "ckpt"),
        "--save",
        str(tmp_path / "ep1_ckpt"),
        "--expert-model-parallel-size",
        "1",
        "--adamoe-metrics-file",
        str(resumed),
        nproc=1,
    )
    assert "resuming at iteration 8" in again.stdout
    assert [i for i, _ in _train_losses(read_metrics(resumed))] == [7, 8, 9, 10]


def test_pipeline_parallel_run_and_its_checkpoint_at_pp1(synthetic_corpus, tmp_path):
    """PP = 2 (1F1B over gloo p2p) trains; its checkpoint evaluates identically at PP = 1."""
    pp2 = tmp_path / "pp2.jsonl"
    run_pretrain(
        synthetic_corpus,
        *TRAIN,
        "--train-iters",
        "6",
        "--save",
        str(tmp_path / "ckpt"),
        "--pipeline-model-parallel-size",
        "2",
        "--expert-model-parallel-size",
        "1",
        "--adamoe-metrics-file",
        str(pp2),
    )
    records = read_metrics(pp2)
    losses = [loss for _, loss in _train_losses(records)]
    assert len(losses) == 6 and losses[-1] < losses[0]
    # Both stages' layers report a measured load.
    assert all(len(r["load"]) == 2 and None not in r["load"] for r in records if "load" in r)
    pp1 = tmp_path / "pp1.jsonl"
    run_pretrain(
        synthetic_corpus,
        *TRAIN,
        "--train-iters",
        "6",
        "--load",
        str(tmp_path / "ckpt"),
        "--expert-model-parallel-size",
        "1",
        "--skip-train",
        "--save",
        "null",
        "--adamoe-metrics-file",
        str(pp1),
        nproc=1,
    )
    assert _validation(read_metrics(pp1)) == _validation(records)[-1:]


def test_tensor_parallel_with_sequence_parallel_follows_the_one_process_run(
    synthetic_corpus, tmp_path
):
    """TP = 2 with sequence parallelism runs on CPU (SequenceParallelTorchNorm, whose weight
    gradients Megatron all-reduces over TP) and trains as one process does, step by step."""
    common = [
        "--train-iters",
        "6",
        "--expert-model-parallel-size",
        "1",
        "--hidden-dropout",
        "0",
        "--attention-dropout",
        "0",
        "--save",
        "null",
    ]
    tp2, tp1 = tmp_path / "tp2.jsonl", tmp_path / "tp1.jsonl"
    run_pretrain(
        synthetic_corpus,
        *common,
        "--tensor-model-parallel-size",
        "2",
        "--sequence-parallel",
        "--adamoe-metrics-file",
        str(tp2),
    )
    run_pretrain(synthetic_corpus, *common, "--adamoe-metrics-file", str(tp1), nproc=1)
    got, expected = _train_losses(read_metrics(tp2)), _train_losses(read_metrics(tp1))
    assert [i for i, _ in got] == [i for i, _ in expected] == list(range(1, 7))
    assert [loss for _, loss in got] == pytest.approx([loss for _, loss in expected], rel=1e-6)
    grad_norms = [
        [r["grad norm"] for r in read_metrics(path) if "grad norm" in r] for path in (tp2, tp1)
    ]
    # Un-reduced norm gradients would show here first (~5e-5 at step 1).
    assert grad_norms[0] == pytest.approx(grad_norms[1], rel=1e-5)


def test_kill_during_save_keeps_previous_checkpoint_and_torchrun_restart_resumes(
    synthetic_corpus, tmp_path
):
    save = tmp_path / "ckpt"
    metrics = tmp_path / "metrics.jsonl"
    marker = tmp_path / "killed"
    leftovers = []
    result = run_pretrain(
        synthetic_corpus,
        "--train-iters",
        "10",
        "--save-interval",
        "4",
        "--save",
        str(save),
        "--adamoe-metrics-file",
        str(metrics),
        max_restarts=1,
        env={"ADAMOE_TEST_KILL_DURING_SAVE": f"8:{marker}"},
        leftovers=leftovers,
        torchrun=True,
    )
    assert marker.exists(), "the save of iteration 8 was never interrupted"
    # The killed rank's helper (dist_checkpointing's results-queue server) died with it.
    assert leftovers == []
    # The restarted workers resumed from iteration 4 (the interrupted save of 8 was not
    # published) and finished; the re-run iterations repeat the first attempt exactly.
    assert "resuming at iteration 4" in result.stdout
    records = [r for r in read_metrics(metrics) if "lm loss" in r]
    iterations = [r["iteration"] for r in records]
    assert iterations == [1, 2, 3, 4, 5, 6, 7, 8, 5, 6, 7, 8, 9, 10]

    def measured(records):  # every record but the wall-clock step time
        return [{k: v for k, v in r.items() if k != "step time"} for r in records]

    assert measured(records[4:8]) == measured(records[8:12])
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "10"
    assert sorted(p.name for p in save.iterdir()) == [
        "iter_0000004",
        "iter_0000008",
        "iter_0000010",
        "latest_checkpointed_iteration.txt",
    ]


def test_interrupted_save_is_never_published(synthetic_corpus, tmp_path):
    save = tmp_path / "ckpt"
    result = run_pretrain(
        synthetic_corpus,
        "--train-iters",
        "10",
        "--save-interval",
        "4",
        "--save",
        str(save),
        env={"ADAMOE_TEST_KILL_DURING_SAVE": f"8:{tmp_path / 'killed'}"},
        check=False,
        torchrun=True,
    )
    assert result.returncode != 0
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    assert (save / "iter_0000008.partial").is_dir() and not (save / "iter_0000008").exists()
    # The previous checkpoint loads and evaluates.
    metrics = tmp_path / "eval.jsonl"
    run_pretrain(
        synthetic_corpus,
        "--train-iters",
        "10",
        "--eval-interval",
        "5",
        "--load",
        str(save),
        "--save",
        "null",
        "--skip-train",
        "--adamoe-metrics-file",
        str(metrics),
    )
    assert [r["iteration"] for r in read_metrics(metrics)] == [4]


BAD_INPUTS = {
    "unknown key": (
        ["--moe-router-top-k", "3"],
        "error: config key 'moe_router_top_k' (command line) is not a known option; "
        "did you mean 'moe_router_topk'?",
    ),
    "missing data": (
        ["--data-path", "/nonexistent/corpus_text"],
        "error: data_path ('/nonexistent/corpus_text') must name an indexed dataset "
        "(/nonexistent/corpus_text.bin is missing); run tools/preprocess_data.py or "
        "`make data` first",
    ),
    "topology": (
        ["--tensor-model-parallel-size", "3"],
        "error: world size (2) must be divisible by tensor x pipeline x context parallel "
        "size (3); launch a multiple of 3 processes or change the layout",
    ),
    "experts vs EP": (
        ["--num-experts", "3"],
        "error: num_experts (3) must be divisible by expert_model_parallel_size (2); "
        "change the expert count or the EP size (EP shards the true experts; null "
        "experts live in the router)",
    ),
    "k vs n + m": (
        ["--moe-router-topk", "9"],
        "error: moe_router_topk (9) must be an integer in [1, num_experts + "
        "adamoe_num_null_experts = 8]; lower it or add null experts (k counts picks "
        "over true and null experts)",
    ),
    "AdaMoEConfig rule": (
        ["--moe-aux-loss-coeff", "0.02"],
        "error: adamoe_aux_loss_coeff_schedule ('piecewise:0.05,100:0.01') must "
        "not be combined with moe_aux_loss_coeff (0.02); keep only one of them",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_launch_script_rejects_bad_inputs_with_one_line(synthetic_corpus, name):
    overrides, message = BAD_INPUTS[name]
    data_path, tokenizer = synthetic_corpus
    result = subprocess.run(
        [
            "launch/pretrain_adamoe.sh",
            "--data-path",
            data_path,
            "--tokenizer-model",
            tokenizer,
            *overrides,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GPUS_PER_NODE": "2", "PYTHON": sys.executable},  # the one under test
    )
    assert result.returncode == 2
    lines = [
        line for line in result.stderr.splitlines() if line.strip() and "warn" not in line.lower()
    ]
    assert lines == [message]
