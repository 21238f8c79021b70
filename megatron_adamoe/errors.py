"""The errors a run reports as one line instead of a traceback.

``OptionError`` (a ``ValueError``): a mistake the user can fix (options, paths, input files,
checkpoints, a full disk), ``<field> (<value>) must <rule>; <fix>``; exit status 2.
``TrainingHalted`` (a ``RuntimeError``): a guard stopped training (a non-finite or spiking loss, a
collapsed router) and saved nothing; exit status 3.
Entry points print either as one line, prefixed with the rank in a multi-process run; every other
exception keeps its traceback. Torch-free, so every layer can raise them.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

EXIT_USER_ERROR = 2
EXIT_HALTED = 3


class OptionError(ValueError):
    """A user-input error: reported as one line, without a traceback."""


class TrainingHalted(RuntimeError):
    """A training guard stopped the run; the state it reached was not saved."""


def error_line(error: BaseException, rank: Optional[int] = None, world_size: int = 1) -> str:
    """``error: <message>`` on one line, ``[rank R] error: ...`` when several ranks run."""
    message = " ".join(str(error).split("\n"))
    prefix = f"[rank {rank}] " if rank is not None and world_size > 1 else ""
    return f"{prefix}error: {message}"


def report(
    error: BaseException,
    rank: Optional[int] = None,
    world_size: int = 1,
    stream: Optional[TextIO] = None,
) -> int:
    """Print ``error_line`` to stderr in one write (ranks share the stream; flushed: the process
    may be killed next); return the exit status (2 for OptionError, 3 for TrainingHalted)."""
    stream = stream or sys.stderr
    stream.write(error_line(error, rank, world_size) + "\n")
    stream.flush()
    return EXIT_HALTED if isinstance(error, TrainingHalted) else EXIT_USER_ERROR
