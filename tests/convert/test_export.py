"""Megatron AdaMoE checkpoint -> export-hf -> transformers: the same model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.conversion import convert, remote_code_run, train_checkpoint

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
CASES = [  # (layout, null type, weight norm, extra options)
    (layout, null_type, weight_norm, extra)
    for layout in ("EP2", "TP2")
    for null_type, weight_norm, extra in [
        ("zero", "true_experts", ()),
        ("zero", "all_selected", ()),
        ("zero", "none", ("--moe-layer-freq", "2")),  # layer 0 MoE, layer 1 dense
        ("identity", "true_experts", ()),
        ("identity", "all_selected", ()),
        ("identity", "none", ()),
    ]
] + [
    ("PP2", "identity", "true_experts", ()),  # each stage saves its own layer
    ("EP2", "zero", "true_experts", ("--no-untie-embeddings-and-output-weights",)),  # tied
    # Compute as a setting: the controller's null bias, expert bias, top-p routing.
    (
        "EP2",
        "zero",
        "true_experts",
        ("--adamoe-target-load", "1.0", "--adamoe-load-controller-rate", "0.5"),
    ),
    (
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
    (
        "EP2",
        "identity",
        "all_selected",
        (
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
]


def _case_id(layout, null_type, weight_norm, extra):
    tags = {
        "--no-untie-embeddings-and-output-weights": "-tied",
        "--adamoe-target-load": "-target",
        "--moe-router-enable-expert-bias": "-expertbias",
        "--adamoe-router-mode": "-topp",
    }
    return f"{layout}-{null_type}-{weight_norm}" + "".join(
        tag for flag, tag in tags.items() if flag in extra
    )


@pytest.mark.parametrize(
    "layout,null_type,weight_norm,extra", CASES, ids=[_case_id(*case) for case in CASES]
)
def test_export_matches_megatron_logits_and_greedy(
    synthetic_corpus, tmp_path, megatron, layout, null_type, weight_norm, extra
):
    """A checkpoint trained a few steps at EP = 2, TP = 2 or PP = 2 -> export-hf ->
    transformers."""
    checkpoint = train_checkpoint(
        synthetic_corpus,
        tmp_path / "ckpt",
        *LAYOUTS[layout],
        "--adamoe-null-expert-type",
        null_type,
        "--adamoe-weight-norm",
        weight_norm,
        *extra,
    )
    out = tmp_path / "hf"
    convert("export-hf", "--load", checkpoint, "--out", out, "--max-shard-size", "200KB")

    with open(out / "config.json") as handle:
        config = json.load(handle)
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_adamoe.AdaMoEForCausalLM"
    assert (config["null_expert_type"], config["router_weight_norm"]) == (null_type, weight_norm)
    with open(out / "model.safetensors.index.json") as handle:
        shards = set(json.load(handle)["weight_map"].values())
    assert len(shards) > 1 and all((out / name).is_file() for name in shards)
    assert not [name for name in os.listdir(tmp_path) if ".tmp-" in name]
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
    hf = remote_code_run(out, tokens, prompt, 16, tmp_path)
    assert hf["model_class"].startswith("transformers_modules.")  # the copied modeling file
    assert hf["tokenizer_class"].startswith("transformers_modules.")

    reference = megatron.load(checkpoint, VOCAB)
    expected = megatron.logits(reference, tokens)
    assert hf["logits"].shape == expected.shape == (2, 48, VOCAB)
    torch.testing.assert_close(hf["logits"], expected, atol=1e-4, rtol=0)
    assert hf["generated"].shape == (1, 8 + 16)
    assert torch.equal(hf["generated"], megatron.greedy(reference, prompt, 16, suppressed))
