"""Inputs checked before any process starts (messages pinned): indexed datasets against
Megatron's format and split rule, writable save and cache directories, YAML syntax."""

from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_adamoe.data import indexed as data_check
from megatron_adamoe.errors import OptionError
from megatron_adamoe.options import load_arguments
from tests.indexed_data import write_indexed_dataset

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CPU_CONFIG = os.path.join(REPO, "configs", "cpu_adamoe_tiny.yaml")


def _options(tmp_path, prefix, **extra):
    (tmp_path / "tok.model").write_bytes(b"")
    return {
        "data_path": [prefix],
        "tokenizer_model": str(tmp_path / "tok.model"),
        "save": str(tmp_path / "ckpt"),
        **extra,
    }


def _error(tmp_path, prefix, **extra) -> str:
    with pytest.raises(OptionError) as info:
        load_arguments(CPU_CONFIG, _options(tmp_path, prefix, **extra), 2)
    return str(info.value)


def test_index_reader_agrees_with_megatrons_reader(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = write_indexed_dataset(str(tmp_path / "c"), [5, 0, 17, 3], vocab_size=70000)
    stats = data_check.read_index(prefix)
    megatron = IndexedDataset(prefix)
    lengths = [len(megatron[i]) for i in range(len(megatron))]
    assert stats.documents == len(megatron.document_indices) - 1 == 4
    assert stats.tokens == sum(lengths) == 25
    assert stats.document_tokens.tolist() == lengths


def test_split_ranges_follow_megatrons_rounding():
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
    )

    for split, documents in (([98, 2, 0], 960), ([96, 4, 0], 7), ([1, 1, 1], 10), ([98, 2, 0], 1)):
        shares = [s / sum(split) for s in split]
        matrix = convert_split_vector_to_split_matrix(shares)
        expected = [
            (0, 0) if b is None else (int(round(b[0] * documents)), int(round(b[1] * documents)))
            for b in matrix
        ]
        got = data_check.split_ranges(split, documents)
        assert [g if g[0] != g[1] else (0, 0) for g in got] == [
            e if e[0] != e[1] else (0, 0) for e in expected
        ]


def test_corpus_too_small_for_its_validation_split(tmp_path):
    """One document (split 98,2,0): the validation split is empty, and Megatron's GPTDataset
    would loop forever counting epochs; found before anything starts."""
    prefix = write_indexed_dataset(str(tmp_path / "one"), [900])
    assert _error(tmp_path, prefix) == (
        f"data_path ('{prefix}') must give the validation split a document and at least "
        "seq_length + 1 = 257 tokens; split '98,2,0' gives it 0 of 1 documents (0 tokens); add "
        "text or change split"
    )
    # Without evaluation the validation split is not read.
    load_arguments(CPU_CONFIG, _options(tmp_path, prefix, eval_interval=None), 2)
    short = write_indexed_dataset(str(tmp_path / "short"), [50] * 3)
    assert _error(tmp_path, short, split="1,0,0", eval_interval=None) == (
        f"data_path ('{short}') must give the training split a document and at least "
        "seq_length + 1 = 257 tokens; split '1,0,0' gives it 3 of 3 documents (150 tokens); "
        "add text or change split"
    )


@pytest.fixture
def corpus(tmp_path):
    return write_indexed_dataset(str(tmp_path / "corpus"), [400] * 60)


def _damage(path, keep_bytes=None, garbage=None):
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(garbage if garbage is not None else data[:keep_bytes])


def test_damaged_data_files_are_named(tmp_path, corpus):
    size = os.path.getsize(corpus + ".bin")
    _damage(corpus + ".bin", keep_bytes=size - 10)
    assert _error(tmp_path, corpus) == (
        f"{corpus}.bin is truncated ({size - 10} bytes; its index describes {size}); rebuild it "
        "with tools/preprocess_data.py"
    )
    _damage(corpus + ".bin", garbage=b"")
    assert _error(tmp_path, corpus).startswith(f"{corpus}.bin is empty (0 bytes;")
    write_indexed_dataset(corpus, [400] * 60)
    index = os.path.getsize(corpus + ".idx")
    _damage(corpus + ".idx", keep_bytes=index - 100)
    assert _error(tmp_path, corpus) == (
        f"{corpus}.idx is truncated ({index - 100} of {index} bytes for 60 sequences); rebuild it "
        "with tools/preprocess_data.py"
    )
    _damage(corpus + ".idx", garbage=os.urandom(index))
    assert _error(tmp_path, corpus) == (
        f"{corpus}.idx must start with Megatron's index header; the file is damaged or not an "
        "index: rebuild it with tools/preprocess_data.py"
    )
    write_indexed_dataset(corpus, [400] * 60)
    raw = bytearray(open(corpus + ".idx", "rb").read())
    raw[34 + 4 * 60 + 8 * 5 : 34 + 4 * 60 + 8 * 6] = np.int64(12345).tobytes()  # a pointer
    open(corpus + ".idx", "wb").write(bytes(raw))
    assert _error(tmp_path, corpus) == (
        f"{corpus}.idx must hold consistent lengths, offsets and document boundaries; the file "
        "is damaged: rebuild it with tools/preprocess_data.py"
    )


def test_save_and_cache_directories_must_be_writable(tmp_path, corpus):
    (tmp_path / "a_file").write_text("")
    assert _error(tmp_path, corpus, save=str(tmp_path / "a_file" / "ckpt")) == (
        f"save ('{tmp_path}/a_file/ckpt') must be a writable directory (Not a directory); "
        "checkpoints go there; fix its permissions or point save elsewhere"
    )
    assert _error(tmp_path, corpus, data_cache_path=str(tmp_path / "a_file" / "cache")) == (
        f"data_cache_path ('{tmp_path}/a_file/cache') must be a writable directory (Not a "
        "directory); the dataset index cache goes there; set data_cache_path to a writable "
        "directory"
    )
    load_arguments(CPU_CONFIG, _options(tmp_path, corpus), 2)
    assert (tmp_path / "ckpt").is_dir() and not list((tmp_path / "ckpt").iterdir())


def test_yaml_syntax_error_is_one_line_with_its_place(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_layers: 4\nhidden_size: [128\nseq_length: 64\n")
    with pytest.raises(OptionError) as info:
        load_arguments(str(path), {}, 1)
    assert str(info.value) == (
        f"config ('{path}') must be valid YAML: expected ',' or ']', but got ':' at line 3, "
        "column 11; fix the file"
    )


def test_token_ids_past_the_tokenizers_vocabulary_are_refused_before_the_run(tmp_path, corpus):
    """Data made with a larger vocabulary than the run's tokenizer would crash the embedding a
    minute into the run (a 231-line IndexError): the largest id is checked up front, and the
    tokenizer path is made absolute so that tools reading the checkpoint find it anywhere."""
    import sentencepiece as spm

    from megatron_adamoe.data.corpus import synthetic_documents

    (tmp_path / "text.txt").write_text("\n".join(synthetic_documents(60, seed=0)))
    spm.SentencePieceTrainer.train(
        input=str(tmp_path / "text.txt"),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=150,
        model_type="bpe",
        minloglevel=2,
    )
    fits = write_indexed_dataset(str(tmp_path / "fits"), [400] * 60, vocab_size=150)
    too_big = write_indexed_dataset(str(tmp_path / "big"), [400] * 60, vocab_size=200)
    expected_largest = int(np.fromfile(too_big + ".bin", dtype=np.uint16).max())
    assert expected_largest >= 150
    options = {"tokenizer_model": "sp.model", "save": str(tmp_path / "ckpt")}
    os.chdir(tmp_path)  # a relative tokenizer path, as a user types it
    try:
        args = load_arguments(CPU_CONFIG, {**options, "data_path": [fits]}, 2)
        assert args.tokenizer_model == str(tmp_path / "sp.model")
        with pytest.raises(OptionError) as info:
            load_arguments(CPU_CONFIG, {**options, "data_path": [too_big]}, 2)
    finally:
        os.chdir(REPO)
    assert str(info.value) == (
        f"data_path ('{too_big}') must hold token ids < the tokenizer's vocabulary (150, "
        f"sp.model); its largest is {expected_largest}: the data was made with another "
        "tokenizer; rebuild it with tools/preprocess_data.py --tokenizer-model, or pass the "
        "tokenizer it was made with"
    )
    # The scan is remembered per file in the dataset cache, and redone when the file changes.
    assert data_check.max_token_id(too_big, str(tmp_path / "cache")) == expected_largest
    assert (tmp_path / "cache" / "adamoe_max_token_id.txt").is_file()
    write_indexed_dataset(too_big, [400] * 60, vocab_size=100)
    assert data_check.max_token_id(too_big, str(tmp_path / "cache")) < 100
