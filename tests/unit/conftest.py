"""The unit tier runs in one process: starting a subprocess or a spawned rank here is a bug
(such tests belong in tests/distributed/ or tests/training/), so it fails the test."""

from __future__ import annotations

import multiprocessing
import subprocess

import pytest


@pytest.fixture(autouse=True)
def no_child_processes(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(
            "unit tests run in one process: move this test to tests/distributed/ or tests/training/"
        )

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(multiprocessing.Process, "start", refuse)
