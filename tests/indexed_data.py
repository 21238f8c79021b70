"""Write small Megatron indexed datasets (``P.bin`` + ``P.idx``) with Megatron-Core's own
``IndexedDatasetBuilder``, for tests that need real data files without a tokenizer."""

from __future__ import annotations

import numpy as np


def write_indexed_dataset(
    prefix: str, document_lengths: list[int], vocab_size: int = 200, seed: int = 0
) -> str:
    """Documents of random token ids with the given lengths; returns ``prefix``."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    dtype = DType.optimal_dtype(vocab_size)
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    for length in document_lengths:
        builder.add_document(rng.integers(0, vocab_size, length).astype(dtype), [length])
    builder.finalize(prefix + ".idx")
    return prefix
