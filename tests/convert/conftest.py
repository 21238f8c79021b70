"""The convert tier: tiny models trained by the real entry point or built with transformers,
converted as a user runs it (tests/conversion.py), compared on logits with Megatron's own load."""

from __future__ import annotations

import pytest
import torch

from tests.conversion import train_checkpoint


@pytest.fixture(scope="session")
def trained(synthetic_corpus, tmp_path_factory):
    """``trained(*options)``: a checkpoint of a few steps of the small model with these options
    (tests/conversion.py), trained once per session for each distinct option list; tests that
    damage one work on a copy."""
    checkpoints = {}

    def get(*options):
        key = tuple(map(str, options))
        if key not in checkpoints:
            directory = tmp_path_factory.mktemp("trained") / "ckpt"
            checkpoints[key] = train_checkpoint(synthetic_corpus, directory, *key)
        return checkpoints[key]

    return get


@pytest.fixture
def megatron(single_rank):
    """Megatron-Core in this process (one gloo rank), loading checkpoints with its own
    dist_checkpointing: the reference side of every comparison."""
    from megatron.core import dist_checkpointing

    from megatron_adamoe.hf.megatron_checkpoint import find_checkpoint, read_arguments
    from megatron_adamoe.hf.megatron_model import build_single_process_model

    class Megatron:
        @staticmethod
        def load(checkpoint, vocab_size):
            directory = find_checkpoint(str(checkpoint))
            model = build_single_process_model(read_arguments(directory), vocab_size)
            state = dist_checkpointing.load({"model": model.sharded_state_dict()}, directory)
            model.load_state_dict(state["model"], strict=True)
            return model.eval()

        @staticmethod
        def logits(model, tokens):
            """GPT forward over [B, S] tokens -> [B, S, V] (explicit causal mask on CPU)."""
            seq = tokens.size(1)
            position_ids = torch.arange(seq).unsqueeze(0).expand_as(tokens)
            mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
            with torch.no_grad():
                return model(tokens, position_ids, mask)

        @staticmethod
        def greedy(model, prompt, steps, suppress=()):
            """Argmax decoding by full recomputation; ``suppress``: ids never chosen."""
            tokens = prompt
            for _ in range(steps):
                logits = Megatron.logits(model, tokens)[:, -1]
                logits[:, list(suppress)] = float("-inf")
                tokens = torch.cat([tokens, logits.argmax(-1)[:, None]], dim=1)
            return tokens

    return Megatron
