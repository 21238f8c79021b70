"""LoRA and QLoRA on an AdaMoE HF model with PEFT (adamoe-finetune --method lora|qlora), as a
user runs it in one process: the paper's targets (the router's n + m rows, w1, w2, w3) train,
the adapters merge into an AdaMoE directory (merged = unmerged), which import-hf takes back to
Megatron with the same logits; QLoRA's 4-bit base runs on this CPU; the paper's recipes run as
their CPU twins."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.conversion import convert
from tests.hf_models import save_standard_tokenizer, tiny_adamoe, tiny_llama_config
from tests.runs import REPO

RECIPES = os.path.join(REPO, "configs", "finetune")
TOKENS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    from megatron_adamoe.data.corpus import synthetic_documents

    root = tmp_path_factory.mktemp("peft_lora")
    tiny_adamoe(root / "model", "\n".join(synthetic_documents(80, seed=0)))
    with open(root / "train.jsonl", "w") as handle:
        for text in synthetic_documents(60, seed=2):
            handle.write(json.dumps({"text": text}) + "\n")
    return root


def _finetune(root, out, *extra) -> list[dict]:
    from megatron_adamoe.hf.finetune import main

    metrics = f"{out}.jsonl"
    status = main(
        [
            "--model",
            str(root / "model"),
            "--data",
            str(root / "train.jsonl"),
            "--output-dir",
            str(out),
            "--logging-steps",
            "1",
            "--metrics-file",
            metrics,
            *extra,
        ]
    )
    assert status == 0
    records = [json.loads(line) for line in open(metrics) if '"loss"' in line]
    assert records and all(
        math.isfinite(r["loss"]) and math.isfinite(r["aux_loss"]) for r in records
    )
    return records


def _logits(model, tokens=TOKENS):
    with torch.no_grad():
        return model.eval()(tokens).logits


def _base(root):
    from transformers import AutoModelForCausalLM

    import megatron_adamoe.hf  # noqa: F401

    return AutoModelForCausalLM.from_pretrained(root / "model", dtype=torch.float32)


def test_lora_on_the_papers_targets_trains_merges_and_goes_back_to_megatron(
    model_and_data, tmp_path, megatron
):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from megatron_adamoe.adapters.peft_lora import load_lora

    root = model_and_data
    weights = (root / "model" / "model.safetensors").read_bytes()
    _finetune(
        root,
        tmp_path / "lora",
        "--method",
        "lora",
        "--seq-length",
        "32",
        "--max-steps",
        "3",
        "--learning-rate",
        "1e-2",
        "--lora-dropout",
        "0",
    )
    assert (root / "model" / "model.safetensors").read_bytes() == weights  # the base untouched
    adapters = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    wrapped = {name.split(".lora_")[0].rsplit(".", 1)[-1] for name in adapters}
    assert wrapped == {"gate", "w1", "w2", "w3"} and len(adapters) == 2 * 2 * (1 + 4 * 3)
    trained = {name for name in adapters if "lora_B" in name and adapters[name].abs().max() > 0}
    assert {name for name in adapters if "gate.lora_B" in name} <= trained  # routers: every step
    for layer in range(2):  # experts: those some token reached in 3 steps (not always all)
        assert any(f"layers.{layer}.block_sparse_moe.experts." in name for name in trained)

    convert(
        "merge-lora",
        "--model",
        root / "model",
        "--adapter",
        tmp_path / "lora",
        "--out",
        tmp_path / "merged",
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    unmerged = load_lora(_base(root), str(tmp_path / "lora"))
    base = _base(root)
    torch.testing.assert_close(_logits(merged), _logits(unmerged), atol=1e-5, rtol=0)
    assert (_logits(merged) - _logits(base)).abs().max() > 1e-3
    for layer, original in zip(merged.model.layers, base.model.layers):
        moved = (layer.block_sparse_moe.gate.weight - original.block_sparse_moe.gate.weight).abs()
        assert moved[:4].max() > 0 and moved[4:].max() > 0  # true and null rows trained
        # the controller moved the null bias during training; it travels with the adapters
        assert layer.block_sparse_moe.null_bias.item() != 1.5

    convert("import-hf", "--hf", tmp_path / "merged", "--out", tmp_path / "ckpt")
    actual = megatron.logits(megatron.load(tmp_path / "ckpt", 256), TOKENS)
    torch.testing.assert_close(actual, _logits(merged), atol=1e-4, rtol=0)


def test_qlora_recipe_runs_on_a_4bit_base_on_cpu_and_merges(model_and_data, tmp_path, caplog):
    """The CPU twin of the paper's Table 1 recipe: 2 epochs, a coefficient per epoch; bitsandbytes
    quantizes every expert and router linear to NF4 on this CPU; the adapters merge into the
    full-precision base."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    from megatron_adamoe.adapters.peft_lora import load_lora
    from megatron_adamoe.hf.finetune import _load_model, parse_flags

    root = model_and_data
    recipe = os.path.join(RECIPES, "cpu_table1_adamoe_qlora.yaml")
    flags = ["--config", recipe, "--seq-length", "32", "--learning-rate", "1e-2"]
    quantized = _load_model(
        parse_flags(["--model", str(root / "model"), "--data", "x", "--output-dir", "y", *flags])
    )
    block = quantized.model.layers[0].block_sparse_moe
    assert isinstance(block.gate, bnb.nn.Linear4bit)
    assert all(isinstance(e.w1, bnb.nn.Linear4bit) for e in block.experts)

    with caplog.at_level("INFO", logger="megatron_adamoe.finetune"):
        records = _finetune(root, tmp_path / "qlora", *flags)
    per_epoch = next(
        int(r.getMessage().split(": ")[1].split()[0])
        for r in caplog.records
        if "optimizer steps per epoch" in r.getMessage()
    )
    assert records[-1]["step"] == 2 * per_epoch > 2
    assert f"aux-loss coefficient per epoch: piecewise:0.01,{per_epoch}:0.001" in caplog.text

    convert(
        "merge-lora",
        "--model",
        root / "model",
        "--adapter",
        tmp_path / "qlora",
        "--out",
        tmp_path / "merged",
    )
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    unmerged = load_lora(_base(root), str(tmp_path / "qlora"))
    torch.testing.assert_close(_logits(merged), _logits(unmerged), atol=1e-5, rtol=0)
    assert (_logits(merged) - _logits(_base(root))).abs().max() > 1e-3


def test_mo_lora_recipe_twin_runs_on_a_dense_llama(tmp_path, caplog):
    """The CPU twin of the paper's Table 2 recipe on a tiny transformers Llama: 2 epochs."""
    from transformers import LlamaForCausalLM

    from megatron_adamoe.data.corpus import synthetic_documents

    save_standard_tokenizer(tmp_path / "model", "fast")
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(tmp_path / "model")
    with open(tmp_path / "train.jsonl", "w") as handle:
        for text in synthetic_documents(30, seed=2):
            handle.write(json.dumps({"text": text}) + "\n")
    recipe = os.path.join(RECIPES, "cpu_table2_molora.yaml")
    with caplog.at_level("INFO", logger="megatron_adamoe.finetune"):
        records = _finetune(tmp_path, tmp_path / "molora", "--config", recipe, "--seq-length", "32")
    per_epoch = next(
        int(r.getMessage().split(": ")[1].split()[0])
        for r in caplog.records
        if "optimizer steps per epoch" in r.getMessage()
    )
    assert records[-1]["step"] == 2 * per_epoch and len(records[-1]["load"]) == 2
    assert sorted(os.listdir(tmp_path / "molora")) == [
        "mo_lora_adapters.safetensors",
        "mo_lora_config.json",
    ]


def test_merge_refuses_mo_lora_adapters_and_adapters_of_another_base(model_and_data, tmp_path):
    from megatron_adamoe.adapters.peft_lora import apply_lora, load_lora, lora_settings, save_lora
    from megatron_adamoe.errors import OptionError
    from megatron_adamoe.hf import AdaMoEForCausalLM

    root = model_and_data
    (tmp_path / "mo").mkdir()
    (tmp_path / "mo" / "mo_lora_config.json").write_text("{}")
    done = convert(
        "merge-lora",
        "--model",
        root / "model",
        "--adapter",
        tmp_path / "mo",
        "--out",
        tmp_path / "out",
        check=False,
    )
    assert done.returncode == 2 and done.stderr.strip() == (
        f"error: adapter ({str(tmp_path / 'mo')!r}) holds Mo-LoRA adapters, which cannot be "
        "merged: each token's update depends on its own routing; load them with "
        "adapters.load_mo_lora"
    )
    config = _base(root).config
    config.moe_intermediate_size = 16  # another base: narrower experts
    save_lora(apply_lora(AdaMoEForCausalLM(config), lora_settings(8, 16, 0.0)), str(tmp_path / "a"))
    with pytest.raises(OptionError) as error:
        load_lora(_base(root), str(tmp_path / "a"))
    assert str(error.value).startswith(
        f"adapter ({str(tmp_path / 'a')!r}) was made for another base: size mismatch for "
        "base_model.model.model.layers.0.block_sparse_moe.experts.0.w1.lora_B.default.weight"
    ) and "\n" not in str(error.value)
    assert not (tmp_path / "out").exists()
