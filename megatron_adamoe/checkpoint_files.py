"""Checkpoint directory names, the tracker file, and whether a checkpoint's files are complete;
no Megatron-Core import (converters read these without starting Megatron)."""

from __future__ import annotations

import os
import re
from typing import Optional

from megatron_adamoe.errors import OptionError

TRACKER = "latest_checkpointed_iteration.txt"
PARTIAL = ".partial"


def checkpoint_dir(root: str, iteration: int) -> str:
    return os.path.join(root, f"iter_{iteration:07d}")


def write_atomically(path: str, text: str) -> None:
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def latest_checkpoint(root: Optional[str]) -> Optional[str]:
    """The directory the tracker names, or None when there is no complete checkpoint."""
    if root is None:
        return None
    tracker = os.path.join(root, TRACKER)
    if not os.path.isfile(tracker):
        if os.path.isfile(os.path.join(root, "metadata.json")):
            return root  # a checkpoint directory given directly
        return None
    with open(tracker) as handle:
        text = handle.read().strip()
    if not text.isdigit():
        raise OptionError(
            f"load ({root!r}) must hold a tracker with an iteration number; "
            f"{TRACKER} reads {text!r}"
        )
    directory = checkpoint_dir(root, int(text))
    if not os.path.isdir(directory):
        raise OptionError(
            f"load ({root!r}) must contain {os.path.basename(directory)}, which "
            f"its {TRACKER} names; restore it or point load elsewhere"
        )
    return directory


def iterations(root: str) -> list[int]:
    """Iterations of the complete (published) checkpoints under ``root``, oldest first."""
    if not root or not os.path.isdir(root):
        return []
    found = (re.fullmatch(r"iter_(\d{7})", name) for name in os.listdir(root))
    return sorted(int(match[1]) for match in found if match)


def damaged_files(directory: str) -> Optional[str]:
    """What is wrong with a dist checkpoint's files (unreadable metadata, a shard its metadata
    names that is missing or shorter than the data it must hold), or None when complete."""
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(directory).read_metadata()
    except Exception as error:  # noqa: BLE001 - any unreadable metadata is the answer
        return f"unreadable metadata (.metadata: {type(error).__name__})"
    needed: dict = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(
            needed.get(info.relative_path, 0), info.offset + info.length
        )
    missing = sorted(name for name in needed if not os.path.isfile(os.path.join(directory, name)))
    if missing:
        return f"missing shard {', '.join(missing)}"
    short = sorted(
        name
        for name, size in needed.items()
        if os.path.getsize(os.path.join(directory, name)) < size
    )
    if short:
        return f"truncated shard {', '.join(short)}"
    return None
