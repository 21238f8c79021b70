"""DeepSpeed's CPU op is built per environment, and a killed build's lock is cleared only when no
build runs."""

from __future__ import annotations

import os
import sys

from megatron_adamoe.deepspeed import extension


def test_builds_go_under_the_running_environment(monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "recorded")  # so teardown restores the original
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    root = extension.use_environment_build_root()
    assert root == os.path.join(sys.prefix, "torch_extensions")
    assert os.environ["TORCH_EXTENSIONS_DIR"] == root
    directory = extension.build_directory()
    assert directory == os.path.join(root, extension.NAME)  # the CPU accelerator has the op


def test_a_set_build_root_is_kept(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    assert extension.use_environment_build_root() == str(tmp_path)


def test_a_lock_is_removed_only_without_a_live_build(tmp_path, monkeypatch):
    (tmp_path / "lock").write_text("")
    (tmp_path / f"{extension.NAME}.so").write_text("")
    assert not extension.is_built(str(tmp_path))
    monkeypatch.chdir(tmp_path)  # this process now "works" in the build directory
    assert not extension.clear_stale_lock(str(tmp_path))
    monkeypatch.chdir(os.path.dirname(tmp_path))
    assert extension.clear_stale_lock(str(tmp_path))
    assert extension.is_built(str(tmp_path))
