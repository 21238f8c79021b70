"""HF Mixtral -> HF AdaMoE without Megatron (``adamoe-convert mixtral-to-adamoe``): the same logits
at m = 0, tiled null rows with m > 0, Mixtral's tokenizer files carried, one-line errors."""

from __future__ import annotations

import torch

from tests.conversion import convert
from tests.hf_models import K, N, tiny_mixtral


def _load(directory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True).eval()


def test_no_null_experts_gives_mixtrals_logits(tmp_path):
    mixtral = tiny_mixtral(tmp_path / "mixtral")
    (tmp_path / "mixtral" / "tokenizer_config.json").write_text("{}")
    convert(
        "mixtral-to-adamoe",
        "--hf",
        tmp_path / "mixtral",
        "--out",
        tmp_path / "ada",
        "--num-null-experts",
        "0",
    )
    model = _load(tmp_path / "ada")
    assert type(model).__name__ == "AdaMoEForCausalLM"
    assert (tmp_path / "ada" / "tokenizer_config.json").read_text() == "{}"
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            model(tokens).logits, mixtral(tokens).logits, rtol=1e-4, atol=1e-4
        )


def test_null_experts_tile_the_gate(tmp_path):
    from megatron_adamoe.hf.import_hf import read_hf_tensors

    tiny_mixtral(tmp_path / "mixtral")
    convert(
        "mixtral-to-adamoe",
        "--hf",
        tmp_path / "mixtral",
        "--out",
        tmp_path / "ada",
        "--num-null-experts",
        str(N),
        "--topk",
        "2",
    )
    model = _load(tmp_path / "ada")
    source = read_hf_tensors(str(tmp_path / "mixtral"))  # Mixtral's checkpoint names
    for index, layer in enumerate(model.model.layers):
        gate = layer.block_sparse_moe.gate.weight
        original = source[f"model.layers.{index}.block_sparse_moe.gate.weight"]
        assert gate.shape == (2 * N, 64)
        assert torch.equal(gate[:N], original) and torch.equal(gate[N:], original)  # tiled
    assert model.config.num_null_experts == N and model.config.num_experts_per_tok == K


def test_mixtral_to_adamoe_rejects_bad_inputs_with_one_line(tmp_path):
    tiny_mixtral(tmp_path / "mixtral")
    bad = convert(
        "mixtral-to-adamoe",
        "--hf",
        tmp_path / "mixtral",
        "--out",
        tmp_path / "x",
        "--num-null-experts",
        "-1",
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == (
        "error: num_null_experts (-1) must be >= 0; pass --num-null-experts"
    )
    convert(
        "mixtral-to-adamoe",
        "--hf",
        tmp_path / "mixtral",
        "--out",
        tmp_path / "ada",
        "--num-null-experts",
        "2",
    )
    again = convert(
        "mixtral-to-adamoe",
        "--hf",
        tmp_path / "ada",
        "--out",
        tmp_path / "y",
        "--num-null-experts",
        "2",
        check=False,
    )
    assert again.returncode == 2 and "must be ['MixtralForCausalLM']" in again.stderr
    assert not list(tmp_path.glob("*.tmp-*"))


def test_topk_past_the_experts_is_one_line_and_settings_carry_over(tmp_path):
    import json

    import pytest

    tiny_mixtral(tmp_path / "mixtral")
    bad = convert(
        "mixtral-to-adamoe",
        "--hf",
        tmp_path / "mixtral",
        "--out",
        tmp_path / "x",
        "--num-null-experts",
        str(N),
        "--topk",
        str(2 * N + 1),
        check=False,
    )
    assert bad.returncode == 2 and bad.stderr.strip() == (
        f"error: topk ({2 * N + 1}) must be in [1, n + m = {2 * N}] (n = {N} true experts of the "
        f"Mixtral model, m = {N} null experts); lower --topk or add --num-null-experts"
    )
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("*.tmp-*"))
    convert(
        "mixtral-to-adamoe",
        "--hf",
        tmp_path / "mixtral",
        "--out",
        tmp_path / "ada",
        "--num-null-experts",
        str(N),
    )
    source = json.loads((tmp_path / "mixtral" / "config.json").read_text())
    converted = json.loads((tmp_path / "ada" / "config.json").read_text())
    for key in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_key_value_heads",
        "max_position_embeddings",
        "rms_norm_eps",
        "tie_word_embeddings",
        "num_experts_per_tok",
        "bos_token_id",
        "eos_token_id",
    ):
        assert converted[key] == source[key], key
    # The one setting that changes, by the scale of the loss it weighs: Mixtral's loss pools
    # the L layers' routing (fractions of T tokens, summing to k), AdaMoE's sums per-layer
    # losses (fractions of k*T): Mixtral's coefficient c becomes c * k / L.
    assert converted["router_aux_loss_coef"] == pytest.approx(
        source["router_aux_loss_coef"] * K / source["num_hidden_layers"]
    )
