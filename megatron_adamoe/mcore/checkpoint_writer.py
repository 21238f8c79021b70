"""dist_checkpointing's torch_dist writer, with a results queue that dies with its rank.

Upstream (``megatron.core.dist_checkpointing.strategies.filesystem_async``,
``_get_write_results_queue``) starts, at the first save, a multiprocessing ``Manager`` server in a
spawned process and keeps its queue in the module global ``_results_queue``. A rank killed while
that server runs (a crash, a node failure, torchrun tearing a job down) leaves the server
orphaned, idle for good. ``start_write_results_queue`` starts the same Manager ourselves, with an
initializer that asks Linux to kill the server when its parent dies (``PR_SET_PDEATHSIG``), and
hands its queue to that global, so upstream uses it unchanged. The server ignores SIGTERM, which
torchrun sends to a worker's whole process group: a rank saves on SIGTERM and needs it. Elsewhere
than Linux it does nothing (upstream's queue is used).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from functools import partial
from multiprocessing.managers import SyncManager

from megatron_adamoe.processes import die_with_parent

_managers: list = []  # the Manager objects must outlive this call


def start_write_results_queue() -> None:
    """Mirrors filesystem_async._get_write_results_queue (spawn context, a Manager queue); the
    server process is killed with this one. Idempotent."""
    if not sys.platform.startswith("linux"):
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is not None:
        return
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    # The server ignores SIGTERM: torchrun signals a worker's whole process group, and the rank,
    # which handles SIGTERM by saving, still needs this server for that save.
    manager.start(initializer=partial(die_with_parent, os.getpid(), ignore_sigterm=True))
    _managers.append(manager)
    filesystem_async._results_queue = manager.Queue()
