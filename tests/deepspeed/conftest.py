"""The DeepSpeed tier: DeepSpeed's CPU communication extension built once for the session, in one
process, before any test starts ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session", autouse=True)
def deepspeed_extension():
    """``python -m megatron_adamoe.deepspeed.extension``, as ``make install`` runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "megatron_adamoe.deepspeed.extension"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
