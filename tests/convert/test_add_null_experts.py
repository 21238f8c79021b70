"""adamoe-convert add-null-experts: a top-2 Megatron checkpoint -> AdaMoE with m null experts, as
a Megatron checkpoint: the router's true rows kept and its null rows tiled (or drawn), the
original's logits when the nulls are never chosen, and the result fine-tunes at another
layout; bad inputs one line each."""

from __future__ import annotations

import pytest
import torch

from tests.conversion import convert, run_pretrain
from tests.convert.test_export import VOCAB
from tests.runs import read_metrics

TOP2 = ("--adamoe-num-null-experts", "0", "--moe-router-topk", "2")


def _routers(model) -> list:
    return [layer.mlp.router for layer in model.decoder.layers]


def test_tile_rows_keep_the_true_logits_and_unchosen_nulls_keep_the_model(
    trained, tmp_path, megatron
):
    checkpoint = trained(*TOP2)
    convert("add-null-experts", "--load", checkpoint, "--out", tmp_path / "tile",
            "--num-null-experts", "4", "--topk", "3")  # fmt: skip
    original = megatron.load(checkpoint, VOCAB)
    tiled = megatron.load(tmp_path / "tile", VOCAB)
    for before, after in zip(_routers(original), _routers(tiled)):
        assert after.weight.shape == (8, before.weight.shape[1])
        assert torch.equal(after.weight[:4], before.weight)  # true logits unchanged
        assert torch.equal(after.weight[4:], before.weight[torch.arange(4) % 4])  # tiled
    convert("add-null-experts", "--load", checkpoint, "--out", tmp_path / "random",
            "--num-null-experts", "4", "--null-router-init", "random", "--seed", "3")  # fmt: skip
    drawn = _routers(megatron.load(tmp_path / "random", VOCAB))
    assert not torch.equal(drawn[0].weight[4:], drawn[1].weight[4:])  # a draw per layer
    assert torch.equal(drawn[0].weight[:4], _routers(original)[0].weight)

    # k = 2 with the controller's null bias far below any logit: nulls are never chosen, so the
    # converted model computes the original's logits
    convert("add-null-experts", "--load", checkpoint, "--out", tmp_path / "unchosen",
            "--num-null-experts", "4", "--target-load", "1.5", "--null-bias=-1e4")  # fmt: skip
    tokens = torch.randint(0, VOCAB, (2, 32), generator=torch.Generator().manual_seed(0))
    expected = megatron.logits(original, tokens)
    actual = megatron.logits(megatron.load(tmp_path / "unchosen", VOCAB), tokens)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_the_converted_checkpoint_fine_tunes_at_another_layout(trained, synthetic_corpus, tmp_path):
    """Saved at EP = 2; fine-tuned (weights only, step 0) at EP = 1 x DP = 2 from its own
    config.yaml, starting at the tiled model's balanced load k x n / (n + m)."""
    checkpoint = trained(*TOP2)
    convert("add-null-experts", "--load", checkpoint, "--out", tmp_path / "ckpt",
            "--num-null-experts", "4", "--topk", "2")  # fmt: skip
    metrics = tmp_path / "metrics.jsonl"
    result = run_pretrain(
        synthetic_corpus,
        "--train-iters", "3", "--log-interval", "1", "--expert-model-parallel-size", "1",
        "--adamoe-metrics-file", str(metrics), "--save", str(tmp_path / "tuned"),
        config=str(tmp_path / "ckpt" / "iter_0000000" / "config.yaml"),
    )  # fmt: skip
    assert f"loaded {tmp_path / 'ckpt' / 'iter_0000000'}" in result.stdout
    records = [r for r in read_metrics(metrics) if "adamoe/load" in r]
    assert [r["iteration"] for r in records] == [1, 2, 3]
    # exactly k x n / (n + m) at the first step: each token's top-2 is a tied (true, null) pair
    assert records[0]["adamoe/load"] == 2 * 4 / 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num-null-experts", "0"], "num_null_experts (0) must be >= 1; pass --num-null-experts"),
        (
            ["--num-null-experts", "2", "--topk", "7"],
            "moe_router_topk (7) must be an integer in [1, num_experts + adamoe_num_null_experts "
            "= 6]; lower it or add null experts (k counts picks over true and null experts)",
        ),
        (
            ["--num-null-experts", "2", "--null-bias=-5"],
            "null_bias (-5.0) needs the load controller (its null bias); pass --target-load too",
        ),
    ],
)
def test_bad_inputs_are_one_line(trained, tmp_path, args, message):
    done = convert("add-null-experts", "--load", trained(*TOP2), "--out", tmp_path / "x", *args,
                   check=False)  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip() == f"error: {message}"
    assert not (tmp_path / "x").exists()


def test_a_checkpoint_with_nulls_is_refused(trained, tmp_path):
    from tests.convert.test_export import case_options

    checkpoint = trained(*case_options("EP2-identity-true_experts"))  # shared; m = 4
    done = convert("add-null-experts", "--load", checkpoint, "--out", tmp_path / "x",
                   "--num-null-experts", "4", check=False)  # fmt: skip
    assert done.returncode == 2 and done.stderr.strip().endswith(
        "already has m = 4 null experts; add-null-experts converts a model without them "
        "(fine-tune this one as it is)"
    )
