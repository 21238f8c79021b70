"""The DeepSpeed tier: DeepSpeed's CPU communication extension built once for the session, in one
process, before any test starts ranks."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    """root/model (a tiny random AdaMoE model) and root/train.jsonl (its synthetic text)."""
    from megatron_adamoe.data.corpus import synthetic_documents
    from tests.hf_models import tiny_adamoe

    root = tmp_path_factory.mktemp("finetune")
    documents = synthetic_documents(120, seed=3)
    with open(root / "train.jsonl", "w") as handle:
        for text in documents:
            handle.write(json.dumps({"text": text}) + "\n")
    tiny_adamoe(str(root / "model"), "\n".join(documents))
    return root
