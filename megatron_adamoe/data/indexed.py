"""Up-front checks of Megatron indexed datasets (``P.bin`` + ``P.idx``), before any process starts.

Reads the ``.idx`` header and arrays as Megatron-Core's ``_IndexReader`` does (magic
``MMIDIDX\\x00\\x00``, version 1, dtype code, sequence and document counts, then int32 lengths,
int64 pointers, int64 document indices) and checks them against each other and against the
``.bin`` size; then applies Megatron's split rule (``convert_split_vector_to_split_matrix`` and
the rounding of ``_build_megatron_dataset_splits``) to count the documents and tokens of every
split the run reads. A split without a token would make ``GPTDataset._get_num_epochs`` loop
forever. Each failure is one ``OptionError`` naming the file and the fix. NumPy only.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from megatron_adamoe.errors import OptionError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
NUMPY_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}  # Megatron's DType codes
HEADER_BYTES = 9 + 8 + 1 + 8 + 8
DTYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # Megatron's DType codes
SPLIT_NAMES = ("training", "validation", "test")
REBUILD = "rebuild it with tools/preprocess_data.py"


@dataclass(frozen=True)
class IndexedDatasetStats:
    documents: int
    tokens: int
    document_tokens: np.ndarray  # [documents]


def read_index(prefix: str) -> IndexedDatasetStats:
    """Check ``prefix.idx`` and ``prefix.bin`` for consistency; return document token counts."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (bin_path, idx_path):
        if not os.path.isfile(path):
            raise OptionError(
                f"data_path ({prefix!r}) must name an indexed dataset ({path} is "
                "missing); run tools/preprocess_data.py or `make data` first"
            )
    try:
        with open(idx_path, "rb") as handle:
            raw = handle.read()
    except OSError as error:
        raise OptionError(
            f"data_path ({prefix!r}) must be readable ({idx_path}: "
            f"{error.strerror}); fix the permissions"
        ) from None
    if len(raw) < HEADER_BYTES or raw[:9] != INDEX_MAGIC:
        raise OptionError(
            f"{idx_path} must start with Megatron's index header; the file is "
            f"damaged or not an index: {REBUILD}"
        )
    version, code, sequences, documents = struct.unpack("<QBQQ", raw[9:HEADER_BYTES])
    if version != 1 or code not in DTYPE_SIZES:
        raise OptionError(
            f"{idx_path} must be a version 1 index with a known token dtype "
            f"(version {version}, dtype code {code}); {REBUILD}"
        )
    expected = HEADER_BYTES + 4 * sequences + 8 * sequences + 8 * documents
    if len(raw) < expected:
        raise OptionError(
            f"{idx_path} is truncated ({len(raw)} of {expected} bytes for "
            f"{sequences} sequences); {REBUILD}"
        )
    lengths = np.frombuffer(raw, np.int32, sequences, HEADER_BYTES).astype(np.int64)
    pointers = np.frombuffer(raw, np.int64, sequences, HEADER_BYTES + 4 * sequences)
    doc_index = np.frombuffer(raw, np.int64, documents, HEADER_BYTES + 12 * sequences)
    itemsize = DTYPE_SIZES[code]
    bad_index = (
        documents < 1
        or doc_index[0] != 0
        or doc_index[-1] != sequences
        or np.any(np.diff(doc_index) < 0)
        or np.any(lengths < 0)
        or (
            sequences
            and (
                pointers[0] != 0 or np.any(pointers[1:] != pointers[:-1] + lengths[:-1] * itemsize)
            )
        )
    )
    if bad_index:
        raise OptionError(
            f"{idx_path} must hold consistent lengths, offsets and document "
            f"boundaries; the file is damaged: {REBUILD}"
        )
    needed = int(lengths.sum()) * itemsize
    size = os.path.getsize(bin_path)
    if size != needed:
        state = "is empty" if size == 0 else "is truncated" if size < needed else "is too long"
        raise OptionError(
            f"{bin_path} {state} ({size} bytes; its index describes {needed}); {REBUILD}"
        )
    cumulative = np.concatenate([[0], np.cumsum(lengths)])
    document_tokens = cumulative[doc_index[1:]] - cumulative[doc_index[:-1]]
    return IndexedDatasetStats(len(document_tokens), int(lengths.sum()), document_tokens)


def split_ranges(split: list[float], num_documents: int) -> list[tuple[int, int]]:
    """[begin, end) document ranges of the train/valid/test splits, Megatron's rounding."""
    total = sum(split)
    bounds = np.cumsum([0.0] + [share / total for share in split])
    return [
        (int(round(lo * num_documents)), int(round(hi * num_documents)))
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]


def check_splits(
    prefix: str,
    stats: IndexedDatasetStats,
    split: list[float],
    split_text: str,
    needed: list[bool],
    seq_length: int,
) -> None:
    """Every split the run reads (``needed``) holds a document and one sample's tokens."""
    for name, (begin, end), wanted in zip(
        SPLIT_NAMES, split_ranges(split, stats.documents), needed
    ):
        if not wanted:
            continue
        tokens = int(stats.document_tokens[begin:end].sum())
        if end - begin < 1 or tokens < seq_length + 1:
            raise OptionError(
                f"data_path ({prefix!r}) must give the {name} split a document and at least "
                f"seq_length + 1 = {seq_length + 1} tokens; split '{split_text}' gives it "
                f"{end - begin} of {stats.documents} documents ({tokens} tokens); add text or "
                "change split"
            )


def max_token_id(prefix: str, cache_dir: str | None = None, chunk: int = 1 << 24) -> int:
    """The largest token id in ``prefix.bin`` (a scan in chunks of ``chunk`` tokens). Remembered
    in ``cache_dir`` (the dataset index cache) per .bin size and time, so large corpora are
    scanned once."""
    bin_path = prefix + ".bin"
    with open(prefix + ".idx", "rb") as handle:
        code = struct.unpack("<QBQQ", handle.read(HEADER_BYTES)[9:])[1]
    stat = os.stat(bin_path)
    key = f"{os.path.abspath(bin_path)} {stat.st_size} {stat.st_mtime_ns}"
    memo = os.path.join(cache_dir, "adamoe_max_token_id.txt") if cache_dir else None
    if memo and os.path.isfile(memo):
        with open(memo) as handle:
            saved_key, _, value = handle.read().rpartition(" ")
        if saved_key == key:
            return int(value)
    tokens = np.memmap(bin_path, dtype=NUMPY_DTYPES[code], mode="r")
    largest = max(
        (int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk)), default=-1
    )
    if memo:
        try:
            os.makedirs(cache_dir, exist_ok=True)
            with open(memo + ".tmp", "w") as handle:
                handle.write(f"{key} {largest}")
            os.replace(memo + ".tmp", memo)
        except OSError:
            pass  # only a memo
    return largest
