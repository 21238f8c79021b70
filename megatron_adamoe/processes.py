"""Helper processes that go when their rank goes. Torch-free and Megatron-free on purpose: a
spawned helper imports this module to run ``die_with_parent``, and a light import keeps its start
fast and silent (importing Megatron there cost seconds per rank and printed its warnings before
any filter of ours applied)."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int, ignore_sigterm: bool = False) -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``); exit at once
    if the parent is already gone. ``ignore_sigterm``: a signal meant for the parent's process
    group (torchrun's SIGTERM) leaves this helper running while the parent handles it. Does
    nothing but the SIGTERM choice elsewhere than Linux."""
    if ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)
