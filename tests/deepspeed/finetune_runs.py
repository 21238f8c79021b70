"""adamoe-finetune as users launch it, for the DeepSpeed tier's tests: one process, torchrun or the
deepspeed launcher (2 CPU processes), on ``root/model`` and ``root/train.jsonl``; a run's metrics
file read back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.runs import REPO, free_port

STEPS = 4


def finetune_command(root, name, launcher, *extra, steps=STEPS) -> list[str]:
    common = [
        "--model",
        str(root / "model"),
        "--data",
        str(root / "train.jsonl"),
        "--output-dir",
        str(root / name),
        "--seq-length",
        "32",
        "--max-steps",
        str(steps),
        "--learning-rate",
        "1e-3",
        "--logging-steps",
        "1",
        "--metrics-file",
        str(root / f"{name}.jsonl"),
        "--per-device-batch-size",
        "1",
        *extra,
    ]
    if launcher == "torchrun":
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "megatron_adamoe.hf.finetune",
            *common,
        ]
    if launcher == "deepspeed":
        return [
            os.path.join(os.path.dirname(sys.executable), "deepspeed"),
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "megatron_adamoe.hf.finetune",
            *common,
        ]
    return [sys.executable, "-m", "megatron_adamoe.hf.finetune", *common]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def read_records(root, name) -> list[dict]:
    return [json.loads(line) for line in open(root / f"{name}.jsonl")]


def run_finetune(root, name, launcher, *extra, steps=STEPS):
    done = subprocess.run(
        finetune_command(root, name, launcher, *extra, steps=steps),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=ENV,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return root / name, read_records(root, name)
