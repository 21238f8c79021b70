"""The layer benchmark runs end to end (tiny shapes, EP = 2 ranks) and prints its table; the
numbers are not asserted, the stock all-to-all row count is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_bench_moe_layer_prints_table():
    command = [
        sys.executable,
        str(ROOT / "tools" / "bench_moe_layer.py"),
        "--hidden",
        "32",
        "--ffn",
        "32",
        "--seq",
        "16",
        "--micro-batch",
        "2",
        "--iters",
        "1",
        "--warmup",
        "0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ratio AdaMoE/stock" in result.stdout
    table = result.stdout.splitlines()
    stock_row = next(line for line in table if line.startswith("stock top-2"))
    assert stock_row.split()[-1] == str(2 * 16 * 2 * 2)  # stock ships T * k rows over both ranks
