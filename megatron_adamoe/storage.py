"""Files a run writes: can a directory take them, why did a write fail, exported trees with the
usual permissions, and directories that appear whole or not at all. Standard library only;
training/ and hf/ both use it."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from typing import Iterator, Optional

from megatron_adamoe.errors import OptionError


def check_writable(name: str, directory: str, why: str) -> None:
    """``directory`` exists or can be made, and a file can be written in it (then removed);
    else an OptionError naming the option ``name``."""
    try:
        os.makedirs(directory, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".adamoe-write-check-", dir=directory)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise OptionError(
            f"{name} ({directory!r}) must be a writable directory ({error.strerror}); {why}"
        ) from None


def storage_problem(error: BaseException, directory: str) -> Optional[str]:
    """'ran out of disk space' or 'is not writable (...)' when ``error`` came from the storage
    under ``directory`` (an errno anywhere in its chain, the errno's text in a message that
    carries it, else a probe write there); else None. Writers report a full disk in many forms:
    safetensors' "No space left on device (os error 28)", torch's "unexpected pos 704 vs 598",
    dist_checkpointing's worker failures quoted inside a CheckpointException."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and _describe(seen):
            return _describe(seen)
        for code, pattern in _ERRNO_TEXT.items():
            if pattern.search(str(seen)):
                return _describe(OSError(code, os.strerror(code)))
        seen = seen.__cause__ or seen.__context__
    try:
        with tempfile.NamedTemporaryFile(dir=directory) as probe:
            probe.write(b"\0" * (1 << 20))
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as probe_error:
        return _describe(probe_error)
    return None


_ERRNO_TEXT = {  # errno -> how messages that only quote it spell it
    code: re.compile(rf"{re.escape(os.strerror(code))}|\[Errno {code}\]|os error {code}\b")
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS)
}


def _describe(error: OSError) -> Optional[str]:
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "ran out of disk space"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR):
        return f"is not writable ({error.strerror})"
    return None


def make_readable(root: str) -> None:
    """Files 0666 and directories 0777, less the umask (writers such as safetensors create
    0600 temporary files), so an exported tree reads like any other."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(root, 0o777 & ~mask)
    for parent, directories, files in os.walk(root):
        for name in directories:
            os.chmod(os.path.join(parent, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(parent, name), 0o666 & ~mask)


@contextlib.contextmanager
def atomic_directory(
    out: str, doing: str, shared: bool = False, owner: bool = True
) -> Iterator[str]:
    """``with atomic_directory(out, "exporting") as temporary:`` write into ``temporary`` (made
    next to ``out``); when the block completes the tree is made readable and renamed to ``out``.
    On any failure nothing is left behind, and a storage failure (a full disk, an unwritable
    place) is one OptionError line naming ``out``; other errors pass unchanged.

    ``shared``: several processes write into one temporary directory (``<out>.partial``, the same
    name for all; ranks saving a sharded model); only the ``owner`` makes, renames and removes
    it, the others only write."""
    temporary = f"{out.rstrip(os.sep)}." + ("partial" if shared else f"tmp-{os.getpid()}")
    try:
        if owner:
            shutil.rmtree(temporary, ignore_errors=True)  # a killed run's leftovers
            os.makedirs(temporary)
        yield temporary
        if owner:
            make_readable(temporary)
            os.replace(temporary, out)
    except Exception as error:
        storage = storage_problem(error, os.path.dirname(os.path.abspath(out)))
        if storage is None:
            raise
        raise OptionError(
            f"out ({out!r}) {storage} while {doing}; nothing was left behind; "
            "free space or pick another path"
        ) from None
    finally:
        if owner:
            shutil.rmtree(temporary, ignore_errors=True)
