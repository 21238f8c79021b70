"""The DeepSpeed tier: DeepSpeed's CPU communication extension built once for the session, in one
process, before any test starts ranks."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from megatron_adamoe.deepspeed.extension import use_environment_build_root

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="session", autouse=True)
def deepspeed_extension():
    """``python -m megatron_adamoe.deepspeed.extension``, as ``make install`` runs it; the build
    root is set here too, so the ranks tests spawn (which call ``deepspeed.init_distributed``
    themselves) load the op from this environment's build."""
    use_environment_build_root()
    done = subprocess.run(
        [sys.executable, "-m", "megatron_adamoe.deepspeed.extension"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=2400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
