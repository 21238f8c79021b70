"""The converters' one atomic-output helper: a directory appears whole, readable, or not at all;
a storage failure is one line naming the output."""

from __future__ import annotations

import errno
import os
import stat

import pytest

from megatron_adamoe.errors import OptionError
from megatron_adamoe.storage import atomic_directory


def test_a_completed_block_renames_the_tree_and_makes_it_readable(tmp_path):
    out = tmp_path / "model"
    with atomic_directory(str(out), "exporting") as temporary:
        assert os.path.isdir(temporary) and not out.exists()
        path = os.path.join(temporary, "weights.bin")
        with open(path, "wb") as handle:
            handle.write(b"w")
        os.chmod(path, 0o600)  # what safetensors leaves behind
    assert sorted(os.listdir(tmp_path)) == ["model"]
    assert stat.S_IMODE(os.stat(out / "weights.bin").st_mode) & 0o044 == 0o044


def test_a_failed_block_leaves_nothing_and_keeps_its_error(tmp_path):
    with pytest.raises(KeyError, match="bad tensor name"):
        with atomic_directory(str(tmp_path / "model"), "importing") as temporary:
            open(os.path.join(temporary, "half-written"), "w").close()
            raise KeyError("bad tensor name")
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_one_line_naming_the_output(tmp_path):
    out = str(tmp_path / "model")
    with pytest.raises(OptionError) as info:
        with atomic_directory(out, "converting"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert str(info.value) == (
        f"out ({out!r}) ran out of disk space while converting; nothing was left behind; free "
        "space or pick another path"
    )
    assert os.listdir(tmp_path) == []
