"""adamoe-finetune --method ada-k as users launch it: one process, DDP under torchrun and ZeRO-2
(2 CPU processes over gloo, half the rows each) train the same allocators on the same global
batches: every logged value and the saved allocators agree within 1e-3; they reload."""

from __future__ import annotations

import pytest
import torch

from tests.deepspeed.finetune_runs import run_finetune

pytestmark = pytest.mark.distributed

ADAK = ["--method", "ada-k", "--learning-rate", "1e-2", "--adak-lambda", "0.01"]


def _allocators(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "adak_allocators.safetensors"))


def test_ada_k_data_parallel_equals_one_process(model_and_data):
    root = model_and_data
    one, one_logs = run_finetune(root, "one", None, *ADAK, "--per-device-batch-size", "4")
    assert [r["step"] for r in one_logs] == [1, 2, 3, 4]
    assert one_logs[-1]["expected_k"] < one_logs[0]["expected_k"]  # the penalty pulls k down
    for name, extra in {
        "ddp": [],
        "zero2": ["--deepspeed", "configs/deepspeed/zero2.json"],
    }.items():
        out, logs = run_finetune(
            root, name, "torchrun", *ADAK, "--per-device-batch-size", "2", *extra
        )
        for mine, theirs in zip(logs, one_logs):
            for key in ("loss", "expected_k", "reward", "reward_topk", "clip_fraction"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-3, abs=1e-6), (name, key)
            assert mine["k"] == pytest.approx(theirs["k"], rel=1e-3), name
        for key, value in _allocators(one).items():
            torch.testing.assert_close(_allocators(out)[key], value, rtol=1e-3, atol=1e-6)
    # The allocators reload onto the unchanged model.
    from transformers import AutoModelForCausalLM

    from megatron_adamoe.adak import AdaK

    model = AutoModelForCausalLM.from_pretrained(str(root / "model"), trust_remote_code=True)
    adak = AdaK.load(model, str(one))
    for allocator, key in zip(adak.allocators, sorted(_allocators(one))):
        assert torch.equal(allocator.proj.weight, _allocators(one)[key])
