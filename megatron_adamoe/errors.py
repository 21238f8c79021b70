"""The one error type for mistakes a user can fix: options, paths, input files, checkpoints.

``OptionError`` is a ``ValueError`` whose message is one line,
``<field> (<value>) must <rule>; <fix>``. Entry points print it as that one line (prefixed with the
rank in a multi-process run) and exit with status 2; every other exception keeps its traceback.
Torch-free, so every layer (ops, mcore, training, hf, tools) can raise it.
"""

from __future__ import annotations

import sys
from typing import Optional, TextIO

EXIT_USER_ERROR = 2


class OptionError(ValueError):
    """A user-input error: reported as one line, without a traceback."""


def error_line(error: BaseException, rank: Optional[int] = None, world_size: int = 1) -> str:
    """``error: <message>`` on one line, ``[rank R] error: ...`` when several ranks run."""
    message = " ".join(str(error).split("\n"))
    prefix = f"[rank {rank}] " if rank is not None and world_size > 1 else ""
    return f"{prefix}error: {message}"


def report(error: BaseException, rank: Optional[int] = None, world_size: int = 1,
           stream: Optional[TextIO] = None) -> int:
    """Print ``error_line`` to stderr (flushed: the process may be killed next); return 2."""
    print(error_line(error, rank, world_size), file=stream or sys.stderr, flush=True)
    return EXIT_USER_ERROR
