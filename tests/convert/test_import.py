"""HF Mixtral -> import-hf -> Megatron AdaMoE: the same model at m = 0, and it fine-tunes."""

from __future__ import annotations

import shutil

import pytest
import torch

from tests.conversion import convert, run_pretrain
from tests.hf_models import K, N, tiny_mixtral
from tests.runs import read_metrics


def test_mixtral_import_with_no_nulls_matches_mixtral_logits(tmp_path, megatron):
    """200 tokens, for TP = 2: Megatron's vocabulary is padded to 256 (128 x TP) with zero rows."""
    mixtral = tiny_mixtral(tmp_path / "mixtral", vocab_size=200)
    convert(
        "import-hf",
        "--hf",
        tmp_path / "mixtral",
        "--out",
        tmp_path / "ckpt",
        "--num-null-experts",
        "0",
        "--tp",
        "2",
    )
    tokens = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = mixtral(tokens).logits
    actual = megatron.logits(megatron.load(tmp_path / "ckpt", 256), tokens)
    torch.testing.assert_close(actual[..., :200], expected, atol=1e-4, rtol=0)
    assert torch.equal(actual[..., 200:], torch.zeros(2, 40, 56))


@pytest.mark.distributed
def test_mixtral_import_with_nulls_fine_tunes_from_the_expected_load(synthetic_corpus, tmp_path):
    """m = n tiled null rows; the pretraining entry point fine-tunes the checkpoint from its own
    config.yaml at the layout import-hf was given (EP = 2)."""
    tiny_mixtral(tmp_path / "mixtral")
    data_path, tokenizer = synthetic_corpus
    shutil.copyfile(tokenizer, tmp_path / "mixtral" / "tokenizer.model")  # carried by import
    convert(
        "import-hf",
        "--hf",
        tmp_path / "mixtral",
        "--out",
        tmp_path / "ckpt",
        "--num-null-experts",
        str(N),
        "--topk",
        str(K),
        "--ep",
        "2",
    )
    metrics = tmp_path / "metrics.jsonl"
    result = run_pretrain(
        (data_path, None),
        "--train-iters",
        "4",
        "--micro-batch-size",
        "4",
        "--seq-length",
        "64",
        "--log-interval",
        "1",
        "--lr",
        "1e-4",
        "--save",
        str(tmp_path / "finetuned"),
        "--adamoe-metrics-file",
        str(metrics),
        config=str(tmp_path / "ckpt" / "iter_0000000" / "config.yaml"),
        small=False,
    )
    records = [r for r in read_metrics(metrics) if "adamoe/load" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3, 4]
    assert f"loaded {tmp_path / 'ckpt' / 'iter_0000000'}" in result.stdout
    # Exactly k*n/(n+m) at the first step: each token's top-2 is a tied (true, null) pair. A
    # router that was not loaded would only come near it.
    assert records[0]["adamoe/load"] == K * N / (N + N)
    assert all(torch.isfinite(torch.tensor(r["lm loss"])) for r in records)
    assert (tmp_path / "finetuned" / "iter_0000004").is_dir()


def test_null_router_rows_tile_or_draw_per_layer():
    from megatron_adamoe.hf.import_hf import _add_null_router_rows

    gates = {f"model.layers.{i}.block_sparse_moe.gate.weight": torch.randn(4, 8) for i in range(2)}
    tiled = _add_null_router_rows(gates, 6, "tile", seed=0)
    for name, gate in gates.items():
        assert torch.equal(tiled[name], torch.cat([gate, gate, gate[:2]]))
    drawn = _add_null_router_rows(gates, 4, "random", seed=0)
    again = _add_null_router_rows(gates, 4, "random", seed=0)
    rows = [drawn[name][4:] for name in gates]
    assert all(torch.equal(drawn[name], again[name]) for name in gates)  # seeded
    assert not torch.equal(rows[0], rows[1])  # a different draw per layer
    assert all(torch.equal(drawn[name][:4], gate) for name, gate in gates.items())
