"""Conversion tests: tiny models trained by the real entry point or built with transformers,
converted with tools/convert_checkpoint.py as a user runs it, compared on logits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.training.conftest import REPO, run_pretrain, synthetic_corpus  # noqa: F401

TIMEOUT_S = 600


def convert(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "tools/convert_checkpoint.py", *map(str, args)],
                            cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S)
    if check and result.returncode != 0:
        raise AssertionError(f"convert {args} failed ({result.returncode}):\n{result.stderr}")
    return result


def train_checkpoint(corpus, directory, *overrides, nproc=2):
    """A few EP = 2 training steps of the small model (GQA), saved under ``directory``."""
    run_pretrain(corpus, "--train-iters", "3", "--num-query-groups", "2", "--save",
                 str(directory), *overrides, nproc=nproc)
    return directory


@pytest.fixture
def megatron(single_rank):
    """Megatron-Core in this process (one gloo rank), loading checkpoints with its own
    dist_checkpointing: the reference side of every comparison."""
    from megatron_adamoe.hf import megatron_model
    from megatron_adamoe.hf.megatron_checkpoint import find_checkpoint, read_arguments

    class Megatron:
        @staticmethod
        def load(checkpoint, vocab_size):
            directory = find_checkpoint(str(checkpoint))
            return megatron_model.load_single_process_model(
                directory, read_arguments(directory), vocab_size)

        logits = staticmethod(megatron_model.causal_logits)

        @staticmethod
        def greedy(model, prompt, steps):
            tokens = prompt
            for _ in range(steps):
                next_token = megatron_model.causal_logits(model, tokens)[:, -1].argmax(-1)
                tokens = torch.cat([tokens, next_token[:, None]], dim=1)
            return tokens

    return Megatron
