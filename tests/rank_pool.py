"""A pool of worker processes that stay up for the whole test session and run the pretraining
entry point (``megatron_adamoe.training.pretrain.main``) as ranks of a gloo world, one run at a
time.

Why: a run of the small test model trains in about a second, but a torchrun launch costs about
15 s of process start-up (torchrun, then every rank importing torch and Megatron-Core). The pool
pays that once. Each run still goes through the entry point's own ``main(argv)``: option
loading and checks, the Trainer, checkpoints, metrics and the one-line errors; only the process
group comes from the pool (a new FileStore world per run) instead of torchrun's environment.
What only torchrun and the launch script do (restarts, SIGTERM, killed ranks, two nodes, the
wrapper's checks) is tested through them (``run_pretrain(..., torchrun=True)``).

Between runs a worker tears down what a run leaves in the process: the process group,
Megatron's parallel state, its MoE metrics tracker and rerun state machine, the environment and
signal handlers. A run that fails on one rank while another waits in a collective would hang
that rank: the pool then kills its workers and starts new ones for the next run. Some process
groups outlive their run (Megatron's DDP hooks form a reference cycle through autograd nodes,
which Python cannot collect; a run that stops with an error leaves its model that way), and each
keeps gloo threads that poll: a worker that holds more than THREAD_LIMIT threads is replaced
before the next run.
"""

from __future__ import annotations

import atexit
import gc
import multiprocessing
import os
import queue as queue_module
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import timedelta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRACE_S = 10  # how long the other ranks may take to end after one rank failed
GROUP_TIMEOUT_S = 120  # a collective no rank joins fails the run instead of hanging it
THREAD_LIMIT = 100  # a worker with more threads than this is replaced (see above)


def _serve(rank: int, parent_pid: int, commands, results) -> None:
    """A worker: imports once, then runs jobs until it reads None; dies with the test process."""
    os.chdir(REPO)
    sys.path.insert(0, REPO)
    from megatron_adamoe.console import quiet_known_upstream_noise
    from megatron_adamoe.processes import die_with_parent

    die_with_parent(parent_pid)
    quiet_known_upstream_noise()
    import torch

    torch.set_num_threads(1)
    from megatron_adamoe.training import pretrain, trainer  # noqa: F401  (the import, once)

    while True:
        job = commands.get()
        if job is None:
            return
        status = _run_job(rank, job)
        results.put((job["id"], rank, status, len(os.listdir("/proc/self/task"))))


def _run_job(rank: int, job: dict) -> int:
    import torch.distributed as dist

    from megatron_adamoe.training.pretrain import main

    saved_env = dict(os.environ)
    saved_fds = _redirect(job["stdout"], job["stderr"])
    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        os.environ.update(
            {
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(job["world_size"]),
                "LOCAL_WORLD_SIZE": str(job["world_size"]),
                **job["env"],
            }
        )
        dist.init_process_group(
            "gloo",
            store=dist.FileStore(job["store"], job["world_size"]),
            rank=rank,
            world_size=job["world_size"],
            timeout=timedelta(seconds=GROUP_TIMEOUT_S),
        )
        return main(list(job["argv"]))
    except SystemExit as done:
        return done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported as torchrun would: a traceback, status 1
        traceback.print_exc()
        return 1
    finally:
        _tear_down()
        for signum, handler in saved_handlers.items():
            signal.signal(signum, handler)
        os.environ.clear()
        os.environ.update(saved_env)
        _restore(saved_fds)


def _tear_down() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.rerun_state_machine import destroy_rerun_state_machine

    from megatron_adamoe.mcore._compat import clear_moe_tracker

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    destroy_rerun_state_machine()
    clear_moe_tracker()
    gc.collect()


def _redirect(stdout_path: str, stderr_path: str) -> list[tuple[int, int]]:
    """Point file descriptors 1 and 2 at the job's files (C++ output included)."""
    saved = []
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        (sys.stdout if fd == 1 else sys.stderr).flush()
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        saved.append((fd, os.dup(fd)))
        os.dup2(target, fd)
        os.close(target)
    return saved


def _restore(saved: list[tuple[int, int]]) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, copy in saved:
        os.dup2(copy, fd)
        os.close(copy)


class RankPool:
    """``run(argv, nproc, env)`` -> ``subprocess.CompletedProcess`` with the ranks' output
    concatenated in rank order, and status 0 when every rank returned 0, else the first failing
    rank's status."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self.context = multiprocessing.get_context("spawn")
        self.workers: list = []
        self.scratch = tempfile.mkdtemp(prefix="adamoe-rank-pool-")
        self.runs = 0
        self.threads = 0  # the most threads a worker held after its last run
        # Before multiprocessing's own exit handler, which would wait for the workers forever.
        atexit.register(self.close)

    def _start(self) -> None:
        self.results = self.context.Queue()
        self.commands = [self.context.Queue() for _ in range(self.size)]
        env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        saved = {name: os.environ.get(name) for name in env}
        os.environ.update(env)  # inherited by the spawned workers
        try:
            self.workers = [
                # Not daemonic: a rank starts helper processes of its own (the checkpoint
                # writer's); die_with_parent ends a worker whose test process is gone.
                self.context.Process(
                    target=_serve, args=(rank, os.getpid(), self.commands[rank], self.results)
                )
                for rank in range(self.size)
            ]
            for worker in self.workers:
                worker.start()
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def _kill(self) -> None:
        for worker in self.workers:
            if worker.is_alive():
                worker.kill()
            worker.join(timeout=5)
        self.workers = []

    def close(self) -> None:
        for rank, worker in enumerate(self.workers):
            if worker.is_alive():
                self.commands[rank].put(None)
        for worker in self.workers:
            worker.join(timeout=10)
        self._kill()

    def run(self, argv, nproc: int = 2, env=None, timeout: float = 600):
        if not 1 <= nproc <= self.size:
            raise ValueError(f"nproc ({nproc}) must be in [1, {self.size}] for this pool")
        if (
            not self.workers
            or not all(w.is_alive() for w in self.workers)
            or self.threads > THREAD_LIMIT
        ):
            self._kill()
            self._start()
            self.threads = 0
        self.runs += 1
        job_dir = os.path.join(self.scratch, f"run{self.runs}")
        os.makedirs(job_dir)
        paths = {
            rank: (os.path.join(job_dir, f"{rank}.out"), os.path.join(job_dir, f"{rank}.err"))
            for rank in range(nproc)
        }
        for rank in range(nproc):
            self.commands[rank].put(
                {
                    "id": self.runs,
                    "argv": [str(a) for a in argv],
                    "world_size": nproc,
                    "store": os.path.join(job_dir, "store"),
                    "env": {k: str(v) for k, v in (env or {}).items()},
                    "stdout": paths[rank][0],
                    "stderr": paths[rank][1],
                }
            )
        statuses = self._collect(nproc, timeout)
        stdout = "".join(_read(paths[rank][0]) for rank in range(nproc))
        stderr = "".join(_read(paths[rank][1]) for rank in range(nproc))
        failed = [statuses.get(rank, 1) for rank in range(nproc) if statuses.get(rank, 1) != 0]
        return subprocess.CompletedProcess(argv, failed[0] if failed else 0, stdout, stderr)

    def _collect(self, nproc: int, timeout: float) -> dict[int, int]:
        """Each rank's status; ranks still running GRACE_S after one failed (or at the timeout)
        are killed with the whole pool."""
        statuses: dict[int, int] = {}
        deadline = time.time() + timeout
        while len(statuses) < nproc:
            if any(status != 0 for status in statuses.values()):
                deadline = min(deadline, time.time() + GRACE_S)
            try:
                job_id, rank, status, threads = self.results.get(timeout=1)
            except queue_module.Empty:
                if time.time() > deadline or not all(w.is_alive() for w in self.workers):
                    self._kill()
                    break
                continue
            if job_id == self.runs:
                statuses[rank] = status
                self.threads = max(self.threads, threads)
        return statuses


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as handle:
            return handle.read()
    except FileNotFoundError:
        return ""
