"""FP8 alignment arithmetic (CPU). The router-level padding that would ship pad rows is rejected
by AdaMoEConfig (pinned in test_config.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_adamoe.ops.fp8 import (
    FP8_RECIPES,
    fp8_align_size,
    local_padding_rows,
    padded_tokens_per_expert,
)


def test_alignment_follows_megatron_for_every_recipe():
    from megatron.core.enums import Fp8Recipe
    from megatron.core.fp8_utils import get_fp8_align_size

    for recipe in FP8_RECIPES:
        assert fp8_align_size(recipe) == get_fp8_align_size(Fp8Recipe(recipe))
    with pytest.raises(ValueError) as info:
        fp8_align_size("nvfp4")
    assert str(info.value) == (
        "fp8_recipe ('nvfp4') must be one of ('delayed', 'tensorwise', "
        "'blockwise', 'mxfp8'); pick one"
    )


def test_counts_round_up_per_expert_and_empty_experts_stay_empty():
    counts = torch.tensor([0, 1, 15, 16, 17, 33])
    assert padded_tokens_per_expert(counts, 16).tolist() == [0, 16, 16, 16, 32, 48]
    assert padded_tokens_per_expert(counts, 32).tolist() == [0, 32, 32, 32, 32, 64]
    assert local_padding_rows(counts, 16) == (0 + 15 + 1 + 0 + 15 + 15)
