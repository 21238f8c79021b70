"""DeepSpeed's CPU communication extension (``deepspeed_shm_comm``), built once before any rank
needs it.

On a CPU machine ``deepspeed.init_distributed`` JIT-compiles a C++ shared-memory collective op
(ninja + g++, minutes). torch's builder serialises builds with a ``lock`` file in the build
directory that every later load also takes; a build that was killed leaves the lock behind, and
then every run waits on it forever. ``prepare`` builds the op in a child process of its own with
a timeout, after removing a lock no live build holds; ``wait_until_built`` lets the other ranks
of a job wait for the one that builds. Run ``python -m megatron_adamoe.deepspeed.extension``
once after installing (``make install`` does).

torch keys its build directory by the op's name only (``~/.cache/torch_extensions/<py>_<cuda>/``),
so two environments on one machine share it: a build from another virtual environment looks
ready, and the first rank to load it rebuilds it (its sources moved) in the middle of a job.
``use_environment_build_root`` puts the builds under the running environment instead
(``sys.prefix``), unless ``TORCH_EXTENSIONS_DIR`` is set; every function here applies it first,
and so does anything that calls ``deepspeed.init_distributed`` without them (the tests' spawned
ranks).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from typing import Optional

from megatron_adamoe.errors import OptionError

NAME = "deepspeed_shm_comm"
BUILD_TIMEOUT_S = 1800
_BUILD = (
    "from deepspeed.accelerator import get_accelerator;"
    "builder = get_accelerator().create_op_builder('ShareMemCommBuilder');"
    "builder is None or builder.load(verbose=False)"
)


def use_environment_build_root() -> str:
    """Set ``TORCH_EXTENSIONS_DIR`` to ``<sys.prefix>/torch_extensions`` unless it is set (or the
    environment is read-only, e.g. a system Python: then torch's default); returns the root.
    Child processes inherit it."""
    if "TORCH_EXTENSIONS_DIR" not in os.environ and os.access(sys.prefix, os.W_OK):
        os.environ["TORCH_EXTENSIONS_DIR"] = os.path.join(sys.prefix, "torch_extensions")
    return os.environ.get("TORCH_EXTENSIONS_DIR", "torch's default")


def build_directory() -> Optional[str]:
    """Where torch builds the op (under ``use_environment_build_root``); None on an accelerator
    that has no such op (GPUs use NCCL)."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    use_environment_build_root()
    if get_accelerator().create_op_builder("ShareMemCommBuilder") is None:
        return None
    return _get_build_directory(NAME, verbose=False)


def is_built(directory: str) -> bool:
    lock = os.path.join(directory, "lock")
    return bool(glob.glob(os.path.join(directory, f"{NAME}*.so"))) and not os.path.exists(lock)


def _build_running(directory: str) -> bool:
    """A live process works in the build directory (torch runs ninja there)."""
    real = os.path.realpath(directory)
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.path.realpath(f"/proc/{pid}/cwd") == real:
                return True
        except OSError:
            continue
    return False


def clear_stale_lock(directory: str) -> bool:
    """Remove the build lock if no build is running; returns whether one was removed."""
    lock = os.path.join(directory, "lock")
    if os.path.exists(lock) and not _build_running(directory):
        os.remove(lock)
        return True
    return False


def prepare(timeout_s: int = BUILD_TIMEOUT_S) -> Optional[str]:
    """Build the op (if not built) in one child process; returns its build directory."""
    directory = build_directory()
    if directory is None:
        return None
    os.makedirs(directory, exist_ok=True)
    if clear_stale_lock(directory):
        print(
            f"removed a stale build lock in {directory} (a build was killed earlier)",
            file=sys.stderr,
        )
    if is_built(directory):
        return directory
    try:
        done = subprocess.run(
            [sys.executable, "-c", _BUILD], capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        clear_stale_lock(directory)
        raise OptionError(
            f"DeepSpeed's {NAME} extension (build directory {directory}) must build "
            f"within {timeout_s} s; check that g++ and ninja work, then run "
            "`python -m megatron_adamoe.deepspeed.extension` again"
        ) from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise OptionError(
            f"DeepSpeed's {NAME} extension must build ({last}); see "
            f"{directory} and run `python -m megatron_adamoe.deepspeed.extension`"
        )
    return directory


def wait_until_built(local_rank: int, timeout_s: int = BUILD_TIMEOUT_S) -> None:
    """Before ``deepspeed.init_distributed`` in every rank: local rank 0 builds (``prepare``),
    the others wait until the op is there, so no two ranks race a build."""
    if local_rank == 0:
        prepare(timeout_s)
        return
    directory = build_directory()
    if directory is None:
        return
    deadline = time.time() + timeout_s
    while not is_built(directory):
        if time.time() > deadline:
            raise OptionError(
                f"DeepSpeed's {NAME} extension must be built within {timeout_s} s "
                f"by local rank 0 ({directory}); run `python -m "
                "megatron_adamoe.deepspeed.extension` once, then relaunch"
            )
        time.sleep(1)


if __name__ == "__main__":
    from megatron_adamoe.errors import report

    started = time.time()
    try:
        where = prepare()
    except OptionError as error:
        sys.exit(report(error))
    print(
        f"DeepSpeed {NAME}: ready in {where} ({time.time() - started:.0f} s)"
        if where
        else f"DeepSpeed {NAME}: not needed on this accelerator"
    )
