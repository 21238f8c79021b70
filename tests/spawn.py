"""The one helper that runs a function on N gloo ranks (spawned processes) and returns results.

Each rank gets a FileStore rendezvous (no ports), CPU mode, and a timeout; a rank's exception is
re-raised in the parent with the child's traceback. ``target(rank, world_size, *args)`` must be a
module-level function (it is pickled by reference).
"""

from __future__ import annotations

import io
import os
import queue as queue_module
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.multiprocessing as mp

DEFAULT_TIMEOUT_S = 300


def _worker(target, rank, world_size, store_path, results, args, timeout_s):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        store = dist.FileStore(store_path, world_size)
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        from megatron_adamoe.mcore.cpu import enable_cpu_mode

        enable_cpu_mode()
        result = target(rank, world_size, *args)
        # Bytes, not tensors: torch's queue would share tensor storage through file descriptors
        # that vanish once this process exits, racing the parent's read.
        buffer = io.BytesIO()
        torch.save(result, buffer)
        results.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
        except Exception:  # noqa: BLE001
            pass
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(target, world_size: int, *args, timeout_s: int = DEFAULT_TIMEOUT_S) -> list:
    """Run ``target(rank, world_size, *args)`` on ``world_size`` ranks; return results by rank."""
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "filestore")
        processes = [
            context.Process(
                target=_worker,
                args=(target, rank, world_size, store_path, results, args, timeout_s),
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        outcomes = {}
        try:
            while len(outcomes) < world_size:
                try:
                    rank, status, payload = results.get(timeout=timeout_s)
                except queue_module.Empty:
                    missing = sorted(set(range(world_size)) - set(outcomes))
                    raise TimeoutError(
                        f"ranks {missing} of {world_size} gave no result within {timeout_s}s"
                    ) from None
                outcomes[rank] = (status, payload)
                if status == "error":
                    break
        finally:
            for process in processes:
                process.join(timeout=5 if len(outcomes) == world_size else 0.1)
                if process.is_alive():
                    process.kill()
        for rank, (status, payload) in sorted(outcomes.items()):
            if status == "error":
                raise RuntimeError(f"rank {rank} of {world_size} failed:\n{payload}")
    return [
        torch.load(io.BytesIO(outcomes[rank][1]), weights_only=False) for rank in range(world_size)
    ]
