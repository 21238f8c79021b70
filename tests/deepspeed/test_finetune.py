"""ZeRO fine-tuning of an AdaMoE model in HF form (the paper's workflow), as users launch it:
ZeRO-2 under torchrun and ZeRO-3 under the deepspeed launcher, 2 CPU processes over gloo, against
one process with the same global batch; null picks leave experts empty; the saved models
reload; the aux loss is megatron_adamoe.ops' loss on the model's own router logits."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from tests.deepspeed.finetune_runs import ENV, STEPS, finetune_command, read_records, run_finetune
from tests.runs import REPO

pytestmark = pytest.mark.distributed


def _ranks_of(out) -> list[int]:
    """PIDs of adamoe-finetune processes writing ``out`` (ranks and launchers)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                words = handle.read().split(b"\0")
        except OSError:
            continue
        if b"megatron_adamoe.hf.finetune" in words and str(out).encode() in words:
            found.append(int(entry))
    return found


def _stop_after_a_step(root, name, launcher, *extra, steps) -> int:
    """Start a run, SIGTERM its launcher once it has logged a step, and return the step of the
    checkpoint its ranks saved, after checking that no rank is left."""
    logged = len(read_records(root, name)) if (root / f"{name}.jsonl").exists() else 0
    process = subprocess.Popen(
        finetune_command(root, name, launcher, *extra, steps=steps),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=ENV,
    )
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if (root / f"{name}.jsonl").exists() and len(read_records(root, name)) > logged:
            process.send_signal(signal.SIGTERM)
            break
        time.sleep(0.02)
    output = process.communicate(timeout=120)[0]
    for _ in range(120):  # the ranks save, then exit on their own
        if not _ranks_of(root / name):
            break
        time.sleep(0.5)
    assert not _ranks_of(root / name), output[-3000:]
    assert "stopped by SIGTERM after step" in output, output[-3000:]
    assert not (root / name).exists()  # no model: the run did not finish
    from transformers.trainer_utils import get_last_checkpoint

    return int(get_last_checkpoint(str(root / f"{name}-checkpoints")).rsplit("-", 1)[1])


def test_zero2_and_zero3_train_as_one_process_does(model_and_data):
    root = model_and_data
    runs = {
        "zero2": run_finetune(
            root,
            "zero2",
            "torchrun",
            "--deepspeed",
            os.path.join(REPO, "configs/deepspeed/zero2.json"),
        ),
        "zero3": run_finetune(  # with gradient checkpointing: the same losses, less memory
            root,
            "zero3",
            "deepspeed",
            "--deepspeed",
            os.path.join(REPO, "configs/deepspeed/zero3.json"),
            "--gradient-checkpointing",
        ),
        # The documented one-process command: DeepSpeed in a one-process world (no MPI).
        "single": run_finetune(
            root,
            "single",
            "python",
            "--gradient-accumulation-steps",
            "2",
            "--deepspeed",
            os.path.join(REPO, "configs/deepspeed/zero2.json"),
        ),
    }
    losses = {
        name: [r["loss"] for r in records if "loss" in r] for name, (_, records) in runs.items()
    }
    assert all(len(values) == STEPS for values in losses.values()), losses
    assert all(torch.isfinite(torch.tensor(values)).all() for values in losses.values())
    for name in ("zero2", "zero3"):
        assert losses[name] == pytest.approx(losses["single"], rel=1e-3), (name, losses)
    for _, records in runs.values():
        logged = [r for r in records if "aux_loss" in r]
        assert logged and all(r["aux_loss"] > 0 and len(r["load"]) == 2 for r in logged)
    # Null picks left some expert without a token in some micro-batch on some rank, and no
    # rank skipped a parameter for it (ZeRO would have stopped on a collective mismatch).
    for _, records in runs.values():
        assert sum(r.get("empty_expert_batches", 0) for r in records) > 0
    # The saved models reload, and all three hold the same weights.
    from transformers import AutoModelForCausalLM

    tokens = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = {}
    for name, (out, _) in runs.items():
        model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        with torch.no_grad():
            logits[name] = model(tokens).logits
    for name in ("zero2", "zero3"):
        torch.testing.assert_close(logits[name], logits["single"], rtol=1e-3, atol=1e-3)


def test_aux_loss_is_the_null_aware_loss_of_ops_on_the_router_logits(model_and_data):
    from transformers import AutoModelForCausalLM

    from megatron_adamoe.ops.losses import null_aware_load_balancing_loss
    from megatron_adamoe.ops.routing import null_expert_topk_routing

    model = AutoModelForCausalLM.from_pretrained(
        model_and_data / "model", trust_remote_code=True
    ).eval()
    tokens = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        output = model(tokens, output_router_logits=True)
    # The model's routers choose with their null bias (the controller's; the loss never sees
    # it) and its loss pulls the nulls to the target load's share (router_target_load 1.0).
    blocks = [layer.block_sparse_moe for layer in model.model.layers]
    expected = 0.0
    for logits_TX, block in zip(output.router_logits, blocks):
        bias_X = torch.cat([torch.zeros(4), block.null_bias.float().expand(4)])
        routing = null_expert_topk_routing(logits_TX, 3, 4, selection_bias_X=bias_X)
        expected = expected + null_aware_load_balancing_loss(
            torch.softmax(logits_TX, dim=-1, dtype=torch.float32),
            routing.routing_map_TX.sum(0),
            logits_TX.size(0),
            3,
            4,
            1.0,
            target_load=1.0,
        )
    assert all(block.null_bias.item() != 0 for block in blocks)
    assert output.aux_loss > 0
    torch.testing.assert_close(output.aux_loss, expected)


def test_sigterm_to_either_launcher_saves_and_resume_is_bit_for_bit(model_and_data):
    """SIGTERM to the deepspeed launcher (which exits without passing it on: each rank sees it
    gone) and to torchrun (which passes it on): every rank finishes its step, the checkpoint of
    that step is saved, nothing is left running; --resume then continues, and the run ends with
    the losses and weights of an uninterrupted one, bit for bit."""
    from safetensors.torch import load_file

    root, steps = model_and_data, 24
    zero3 = ("--deepspeed", os.path.join(REPO, "configs/deepspeed/zero3.json"))
    reference, reference_records = run_finetune(root, "reference", "deepspeed", *zero3, steps=steps)
    first = _stop_after_a_step(root, "resumed", "deepspeed", *zero3, steps=steps)
    second = _stop_after_a_step(root, "resumed", "torchrun", *zero3, "--resume", steps=steps)
    assert 1 <= first < second < steps
    resumed, records = run_finetune(root, "resumed", "deepspeed", *zero3, "--resume", steps=steps)
    losses = {r["step"]: r["loss"] for r in records if "loss" in r}
    expected = {r["step"]: r["loss"] for r in reference_records if "loss" in r}
    assert sorted(losses) == sorted(expected) == list(range(1, steps + 1))
    assert losses == expected
    weights, reference_weights = (
        load_file(resumed / "model.safetensors"),
        load_file(reference / "model.safetensors"),
    )
    assert weights.keys() == reference_weights.keys()
    assert all(torch.equal(weights[k], reference_weights[k]) for k in weights)
    assert not (root / "reference-checkpoints").exists()  # none asked for: no empty place left


def test_lora_under_zero3_trains_as_one_process_does(model_and_data):
    """PEFT LoRA on the paper's targets under ZeRO-3 (torchrun, 2 ranks; experts left without
    rows on a rank) against one process with the same global batch: the same losses, and the
    adapters gathered from the partitions equal the one-process ones."""
    from safetensors.torch import load_file

    root = model_and_data
    lora = ("--method", "lora", "--lora-dropout", "0")
    zero3 = run_finetune(
        root, "lora_zero3", "torchrun", *lora,
        "--deepspeed", os.path.join(REPO, "configs/deepspeed/zero3.json"),
    )  # fmt: skip
    single = run_finetune(root, "lora_single", "python", *lora, "--per-device-batch-size", "2")
    losses = [[r["loss"] for r in records if "loss" in r] for _, records in (zero3, single)]
    assert len(losses[0]) == STEPS and losses[0] == pytest.approx(losses[1], rel=1e-3), losses
    assert sum(r.get("empty_expert_batches", 0) for r in zero3[1]) > 0
    adapters = [load_file(out / "adapter_model.safetensors") for out, _ in (zero3, single)]
    assert sorted(adapters[0]) == sorted(adapters[1]) and len(adapters[0]) == 52
    # the adapters gathered from ZeRO-3's partitions give the one-process model's logits (Adam
    # moves near-zero-gradient entries by up to lr either way, so compare what they compute)
    from transformers import AutoModelForCausalLM

    from megatron_adamoe.adapters.peft_lora import load_lora

    tokens = torch.randint(4, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    logits = []
    for out, _ in (zero3, single):
        base = AutoModelForCausalLM.from_pretrained(root / "model", trust_remote_code=True)
        with torch.no_grad():
            logits.append(load_lora(base, str(out)).eval()(tokens).logits)
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-3, atol=1e-3)
