"""Megatron AdaMoE checkpoint -> export-hf -> transformers: the same model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conversion import convert, remote_code_outputs

VOCAB = 256  # the synthetic corpus' tokenizer (233 pieces), padded by Megatron
EP2 = ("--expert-model-parallel-size", "2", "--num-query-groups", "2")  # and GQA
TP2 = (
    "--tensor-model-parallel-size",
    "2",
    "--sequence-parallel",
    "--expert-model-parallel-size",
    "1",
)
PP2 = ("--pipeline-model-parallel-size", "2", "--expert-model-parallel-size", "1")
LAYOUTS = {"EP2": EP2, "TP2": TP2, "PP2": PP2}
# One checkpoint per case, each a layout and a set of options, so that every mapping branch and
# every routing setting goes through export once: both null types, the three weight norms, a
# dense layer, GQA, tied embeddings, the controller's null bias, expert bias and top-p. (The
# routing maths of each null type x weight norm is checked in-process against ops, in
# tests/unit/test_hf_model.py; the weight mapping does not branch on them.)
CASES = {  # name: (layout, null type, weight norm, extra options)
    "EP2-identity-true_experts": ("EP2", "identity", "true_experts", ()),
    "EP2-zero-none-dense-target": (
        "EP2",
        "zero",
        "none",
        (
            "--moe-layer-freq",
            "2",  # layer 0 MoE, layer 1 dense
            "--adamoe-target-load",
            "1.0",
            "--adamoe-load-controller-rate",
            "0.5",
        ),
    ),
    "EP2-identity-all_selected-topp-tied": (
        "EP2",
        "identity",
        "all_selected",
        (
            "--no-untie-embeddings-and-output-weights",
            "--adamoe-router-mode",
            "topp",
            "--adamoe-topp-threshold",
            "0.7",
            "--adamoe-target-load",
            "1.2",
            "--adamoe-load-controller-rate",
            "0.5",
        ),
    ),
    "TP2-zero-true_experts-expertbias": (
        "TP2",
        "zero",
        "true_experts",
        (
            "--moe-router-enable-expert-bias",
            "--moe-router-bias-update-rate",
            "0.05",
            "--adamoe-load-controller-rate",
            "0.5",
        ),
    ),
    "TP2-identity-none": ("TP2", "identity", "none", ()),
    "PP2-identity-true_experts": ("PP2", "identity", "true_experts", ()),  # a save per stage
}


def case_options(case: str) -> tuple:
    layout, null_type, weight_norm, extra = CASES[case]
    return (
        *LAYOUTS[layout],
        "--adamoe-null-expert-type",
        null_type,
        "--adamoe-weight-norm",
        weight_norm,
        *extra,
    )


@pytest.mark.distributed
@pytest.mark.parametrize("case", sorted(CASES))
def test_export_matches_megatron_logits_and_greedy(trained, tmp_path, megatron, case):
    """A checkpoint trained a few steps at EP = 2, TP = 2 or PP = 2 -> export-hf ->
    transformers (the exported directory's own remote code)."""
    _, null_type, weight_norm, extra = CASES[case]
    checkpoint = trained(*case_options(case))
    out = tmp_path / "hf"
    convert("export-hf", "--load", checkpoint, "--out", out, "--max-shard-size", "200KB")

    with open(out / "config.json") as handle:
        config = json.load(handle)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_adamoe.AdaMoEForCausalLM"
    assert (config["null_expert_type"], config["router_weight_norm"]) == (null_type, weight_norm)
    with open(out / "model.safetensors.index.json") as handle:
        shards = set(json.load(handle)["weight_map"].values())
    assert len(shards) > 1 and all((out / name).is_file() for name in shards)
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]  # renamed when done
    with open(out / "generation_config.json") as handle:
        suppressed = json.load(handle).get("suppress_tokens") or []
    assert suppressed == list(range(233, VOCAB))  # the tokenizer's 233 pieces, padded to 256

    if "--adamoe-target-load" in extra or "--moe-router-enable-expert-bias" in extra:
        from safetensors import safe_open

        biases = []
        for name in shards:
            with safe_open(str(out / name), framework="pt") as handle:
                biases += [handle.get_tensor(k) for k in handle.keys() if k.endswith("_bias")]
        assert biases and any(bias.abs().sum() > 0 for bias in biases)  # the controller moved
        assert config["router_null_bias"] and config["router_target_load"] is not None

    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    prompt = tokens[:1, :8]
    hf = remote_code_outputs(out, tokens, prompt, 16)
    assert hf["model_class"].startswith("transformers_modules.")  # the copied modeling file
    assert hf["tokenizer_class"].startswith("transformers_modules.")

    reference = megatron.load(checkpoint, VOCAB)
    expected = megatron.logits(reference, tokens)
    assert hf["logits"].shape == expected.shape == (2, 48, VOCAB)
    torch.testing.assert_close(hf["logits"], expected, atol=1e-4, rtol=0)
    assert hf["generated"].shape == (1, 8 + 16)
    assert torch.equal(hf["generated"], megatron.greedy(reference, prompt, 16, suppressed))


@pytest.mark.distributed
def test_dense_run_exports_as_transformers_llama(trained, tmp_path, megatron):
    """num_experts 0 (the dense twin), trained at TP = 2 -> export-hf -> transformers' own
    LlamaForCausalLM (no remote code for the model): Megatron's logits."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    checkpoint = trained(
        *TP2, "--num-experts", "0", "--adamoe-num-null-experts", "0", "--ffn-hidden-size", "96"
    )
    out = tmp_path / "llama"
    convert("export-hf", "--load", checkpoint, "--out", out)
    with open(out / "config.json") as handle:
        config = json.load(handle)
    assert config["model_type"] == "llama" and "auto_map" not in config
    assert not (out / "modeling_adamoe.py").exists()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model) is LlamaForCausalLM and model.config.intermediate_size == 96

    tokens = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(tokens).logits
    expected = megatron.logits(megatron.load(checkpoint, VOCAB), tokens)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)
