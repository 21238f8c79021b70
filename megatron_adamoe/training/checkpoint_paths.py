"""Checkpoint directory names and the tracker file; no Megatron-Core import (converters read
these without starting Megatron)."""

from __future__ import annotations

import os
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
        raise OptionError(f"load ({root!r}) must hold a tracker with an iteration number; "
                         f"{TRACKER} reads {text!r}")
    directory = checkpoint_dir(root, int(text))
    if not os.path.isdir(directory):
        raise OptionError(f"load ({root!r}) must contain {os.path.basename(directory)}, which "
                         f"its {TRACKER} names; restore it or point load elsewhere")
    return directory
