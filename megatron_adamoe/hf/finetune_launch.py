"""How adamoe-finetune sits under its launcher: a one-process world when started without one, and
a rank that stops cleanly (a checkpoint, then exit) when its launcher goes away.

- Started as ``adamoe-finetune ... --deepspeed cfg.json`` in one process, DeepSpeed would look for
  MPI to discover its world (mpi4py, absent here): the environment of a one-process torchrun
  world is set first (rank 0 of 1, a free local port).
- The ``deepspeed`` launcher, stopped by SIGTERM, exits while its ``launch.py`` and the ranks go
  on, orphaned. Each rank watches the launcher processes above it (torchrun, deepspeed's runner
  and launch.py, found by their command lines); when one is gone the rank sends itself SIGTERM,
  which the Trainer handles like a signal from the launcher: it finishes the step, saves a
  checkpoint and stops (``finetune_trainer.StopOnSignal``).
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time

_LAUNCHER_WORDS = ("torch.distributed.run", "torchrun", "deepspeed", "launch.py")


def set_single_process_world() -> bool:
    """Without a launcher's environment, that of a one-process world; returns whether set."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return False
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    return True


def _parent_and_command(pid: int) -> tuple[int, str]:
    with open(f"/proc/{pid}/stat") as handle:
        parent = int(handle.read().rsplit(")", 1)[1].split()[1])
    with open(f"/proc/{pid}/cmdline", "rb") as handle:
        command = handle.read().replace(b"\0", b" ").decode(errors="replace")
    return parent, command


def launcher_processes() -> list[int]:
    """The PIDs above this process whose command line is a launcher's, nearest first (none when
    started from a shell). Linux only (/proc); elsewhere none."""
    found, pid = [], os.getppid()
    try:
        while pid > 1:
            parent, command = _parent_and_command(pid)
            if not any(word in command for word in _LAUNCHER_WORDS):
                break
            found.append(pid)
            pid = parent
    except (OSError, ValueError, IndexError):
        pass
    return found


def watch_launchers(interval_s: float = 0.25) -> threading.Thread | None:
    """A daemon thread that sends this process SIGTERM once any of its launcher processes is
    gone; None when there is none to watch."""
    pids = launcher_processes()
    if not pids:
        return None

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            for pid in pids:
                try:
                    os.kill(pid, 0)
                    gone = _is_zombie(pid)
                except ProcessLookupError:
                    gone = True
                except PermissionError:
                    gone = False
                if gone:
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

    thread = threading.Thread(target=watch, name="adamoe-launcher-watch", daemon=True)
    thread.start()
    return thread


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
