"""Running the pretraining entry point (2 gloo ranks unless told otherwise) on the synthetic
corpus the real preprocessing tool writes; a small model (``SMALL``); reading its metrics file.
Runs go through the session's rank pool (tests/rank_pool.py: the entry point's ``main`` in
workers that stay up), or through torchrun as a user types it (``torchrun=True``: for what only
the launcher does). Used by the training and convert tiers (fixtures: tests/conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 600
RUN_ID_ENV = "ADAMOE_TEST_RUN_ID"

# The small model of the training and convert tiers: 2 layers, hidden 64, and the CPU config's
# 4 true + 4 null experts at top-3; a few quick steps. Options by name (None = null).
SMALL_MODEL = {
    "num_layers": 2,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "seq_length": 64,
    "moe_ffn_hidden_size": 64,
    "micro_batch_size": 4,
    "global_batch_size": 8,
    "lr_warmup_iters": 2,
    "log_interval": 2,
    "eval_iters": 2,
    "hidden_dropout": 0.1,
    "attention_dropout": 0.1,
    "tensorboard_dir": None,
    "save_interval": None,
}


def small_model_args(**changes) -> list[str]:
    """SMALL_MODEL, with ``changes``, as the entry point's flags (``--num-layers 2 ...``)."""
    flags = []
    for name, value in {**SMALL_MODEL, **changes}.items():
        flags += ["--" + name.replace("_", "-"), "null" if value is None else str(value)]
    return flags


SMALL = small_model_args()


def free_port() -> int:
    """A TCP port free now on this machine (torchrun's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_synthetic_corpus(directory) -> tuple[str, str]:
    """(data_path, tokenizer_model) written by tools/preprocess_data.py --input synthetic."""
    prefix = os.path.join(str(directory), "synthetic")
    subprocess.run(
        [
            sys.executable,
            "tools/preprocess_data.py",
            "--input",
            "synthetic",
            "--output-prefix",
            prefix,
            "--train-tokenizer",
            "--vocab-size",
            "256",
            "--no-progress",
        ],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=TIMEOUT_S,
    )
    return prefix + "_text", prefix + "_tokenizer.model"


def run_pretrain(
    corpus,
    *overrides,
    nproc=2,
    max_restarts=0,
    env=None,
    check=True,
    config="configs/cpu_adamoe_tiny.yaml",
    small=True,
    timeout=TIMEOUT_S,
    leftovers=None,
    torchrun=False,
    python=None,
):
    """Run the entry point with ``config`` (the CPU default), SMALL and ``overrides`` on
    ``nproc`` ranks of the rank pool, or (``torchrun``) under torchrun. torchrun only:
    ``max_restarts``; ``leftovers``, a list that receives the command lines of processes of this
    run still alive two seconds after it ended (they are killed either way); ``python``, another
    interpreter (another environment) to run it with."""
    data_path, tokenizer = corpus
    argv = [
        "--config",
        config,
        *(SMALL if small else []),
        "--data-path",
        data_path,
        *(["--tokenizer-model", tokenizer] if tokenizer else []),
        *overrides,
    ]
    if torchrun or python:
        result = _torchrun(argv, nproc, max_restarts, env, timeout, leftovers, python)
    else:
        assert not max_restarts and leftovers is None, "restarts and leftovers need torchrun=True"
        result = rank_pool().run(argv, nproc=nproc, env=env, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"pretrain failed ({result.returncode}):\n{result.stdout[-4000:]}"
            f"\n{result.stderr[-8000:]}"
        )
    return result


_POOL = None


def rank_pool():
    """The session's rank pool, started on first use (closed by tests/conftest.py)."""
    global _POOL
    if _POOL is None:
        from tests.rank_pool import RankPool

        _POOL = RankPool(size=2)
    return _POOL


def close_rank_pool() -> None:
    global _POOL
    if _POOL is not None:
        _POOL.close()
        _POOL = None


def _torchrun(argv, nproc, max_restarts, env, timeout, leftovers, python=None):
    command = [
        python or sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(free_port()),
        "--max-restarts",
        str(max_restarts),
        "-m",
        "megatron_adamoe.training.pretrain",
        *argv,
    ]
    run_id = uuid.uuid4().hex
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", RUN_ID_ENV: run_id, **(env or {})}
    # Output to files, leftovers killed after: a process a run leaves behind (a test that kills
    # ranks checks there is none) would hold inherited pipes open and linger.
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        process = subprocess.Popen(
            command, cwd=REPO, env=full_env, stdout=out, stderr=err, text=True
        )
        try:
            returncode = process.wait(timeout=timeout)
        finally:
            if leftovers is not None:
                time.sleep(2)
                leftovers.extend(_processes_of_run(run_id).values())
            _kill_processes_of_run(run_id)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(command, returncode, out.read(), err.read())


def _processes_of_run(run_id: str) -> dict[int, str]:
    """{pid: command line} of the live processes started by the run ``run_id``."""
    marker = f"{RUN_ID_ENV}={run_id}".encode()
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as handle:
                if marker not in handle.read().split(b"\0"):
                    continue
            with open(f"/proc/{pid}/stat") as handle:
                if handle.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # exited, waiting for its parent to reap it
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                found[int(pid)] = handle.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            continue
    return found


def _kill_processes_of_run(run_id: str) -> None:
    for pid in _processes_of_run(run_id):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue


def read_metrics(path) -> list[dict]:
    with open(path) as handle:
        return [json.loads(line) for line in handle]
