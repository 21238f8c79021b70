"""The launch script as users type it: `torchrun launch/pretrain_adamoe.sh ...` (single node and
two nodes, static ranks and c10d rendezvous), the same file run directly as the wrapper, and a
user-input error met by rank 1 alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.runs import REPO, free_port, read_metrics, small_model_args

pytestmark = pytest.mark.distributed

TIMEOUT_S = 300
SCRIPT = "launch/pretrain_adamoe.sh"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]  # the `torchrun` of this venv
TINY = small_model_args(
    lr_warmup_iters=1, log_interval=1, eval_iters=1, hidden_dropout=0.0, attention_dropout=0.0
)


def _training_args(corpus, tmp_path, name):
    data_path, tokenizer = corpus
    return [
        "--train-iters",
        "3",
        "--eval-interval",
        "3",
        *TINY,
        "--data-path",
        data_path,
        "--tokenizer-model",
        tokenizer,
        "--save",
        str(tmp_path / name),
        "--adamoe-metrics-file",
        str(tmp_path / f"{name}.jsonl"),
    ]


def _env(**extra):
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def _check_trained_and_saved(tmp_path, name, result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert (tmp_path / name / "iter_0000003").is_dir()
    assert (tmp_path / name / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    records = read_metrics(tmp_path / f"{name}.jsonl")
    assert [r["iteration"] for r in records if "lm loss" in r] == [1, 2, 3]


def test_torchrun_runs_the_launch_script_as_typed(synthetic_corpus, tmp_path):
    result = subprocess.run(
        [
            *TORCHRUN,
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            SCRIPT,
            "--config",
            "configs/cpu_adamoe_tiny.yaml",
            *_training_args(synthetic_corpus, tmp_path, "torchrun"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(),
    )
    _check_trained_and_saved(tmp_path, "torchrun", result)
    assert "EP=2 DP=2" in result.stdout


def test_the_launch_script_run_directly_wraps_torchrun(synthetic_corpus, tmp_path):
    """What `make demo` runs. Its screen shows the run, not upstream's known noise (warnings
    about Transformer Engine and Apex from every rank's helper process, the CPU-mode RNG notice
    at every dropout, the rerun state machine's start): dropout is on to provoke the RNG one."""
    result = subprocess.run(
        [
            SCRIPT,
            *_training_args(synthetic_corpus, tmp_path, "wrapper"),
            "--hidden-dropout",
            "0.1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(
            CONFIG="configs/cpu_adamoe_tiny.yaml",
            GPUS_PER_NODE="2",
            MASTER_PORT=str(free_port()),
            PYTHON=sys.executable,
        ),
    )
    _check_trained_and_saved(tmp_path, "wrapper", result)
    noise = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if any(word in line for word in ("Warning", "warnings.warn", "Rerun", "RNG state"))
    ]
    assert noise == []


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_of_one_process_each(synthetic_corpus, tmp_path, rendezvous):
    """`torchrun --nnodes 2 --node-rank R --master-addr ...` and c10d rendezvous, one process
    per "node" on this machine (EP = 2 across the nodes)."""
    port = str(free_port())
    if rendezvous == "static":
        node_args = [
            [
                "--nnodes",
                "2",
                "--node-rank",
                str(rank),
                "--master-addr",
                "127.0.0.1",
                "--master-port",
                port,
            ]
            for rank in (0, 1)
        ]
    else:
        node_args = [
            [
                "--nnodes",
                "2",
                "--rdzv-backend",
                "c10d",
                "--rdzv-endpoint",
                f"127.0.0.1:{port}",
                "--rdzv-id",
                "adamoe-test",
            ]
        ] * 2
    nodes = [
        subprocess.Popen(
            [
                *TORCHRUN,
                "--nproc-per-node",
                "1",
                *args,
                SCRIPT,
                *_training_args(synthetic_corpus, tmp_path, "nodes"),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        for args in node_args
    ]
    try:
        outputs = [node.communicate(timeout=TIMEOUT_S) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    for node, (stdout, stderr) in zip(nodes, outputs):
        assert node.returncode == 0, stdout[-3000:] + stderr[-6000:]
    assert any("EP=2 DP=2" in stdout for stdout, _ in outputs)
    assert (tmp_path / "nodes" / "iter_0000003").is_dir()


def test_a_user_error_met_on_rank_one_only_is_printed_as_one_line(synthetic_corpus, tmp_path):
    """Only rank 1 meets the error (tests/training/rank_one_error.py injects it): it prints the
    one line with its rank, and the run exits non-zero."""
    result = subprocess.run(
        [
            *TORCHRUN,
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "tests/training/rank_one_error.py",
            "--config",
            "configs/cpu_adamoe_tiny.yaml",
            *_training_args(synthetic_corpus, tmp_path, "rank1"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=_env(),
    )
    assert result.returncode != 0
    lines = (result.stdout + result.stderr).splitlines()
    assert (
        "[rank 1] error: tokenizer_model ('rank-1-only.model') must be readable on every "
        "rank; copy it to this node" in lines
    )
    assert lines.count(next(line for line in lines if "error: tokenizer_model" in line)) == 1
    assert "OptionError" not in result.stdout + result.stderr  # no worker traceback
