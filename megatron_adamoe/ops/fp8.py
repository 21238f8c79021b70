"""FP8 alignment of per-expert token counts: padding that stays local to the expert GEMM.

Pure torch. FP8 GEMMs need each expert's row count to be a multiple of the recipe's alignment
(Megatron-Core's ``get_fp8_align_size``: 32 for MXFP8, 16 otherwise). AdaMoE's counts are often
small, zero, or odd. Megatron's ``moe_router_padding_for_quantization`` would pad them in the
routing map, so the pad rows cross the all-to-all; AdaMoE rejects it. Instead the experts pad
after the all-to-all, inside the expert computation (Transformer Engine's ``Fp8Padding`` in
``TEGroupedMLP``), so every row on the network is a true assignment.

Shape legend: E experts (local to this rank).
"""

from __future__ import annotations

import torch

from megatron_adamoe.errors import OptionError
from megatron_adamoe.options.vocab import FP8_RECIPES


def fp8_align_size(recipe: str) -> int:
    """Rows per expert must be a multiple of this for the FP8 grouped GEMM."""
    if recipe not in FP8_RECIPES:
        raise OptionError(f"fp8_recipe ({recipe!r}) must be one of {FP8_RECIPES}; pick one")
    return 32 if recipe == "mxfp8" else 16


def padded_tokens_per_expert(tokens_per_expert_E: torch.Tensor, align: int) -> torch.Tensor:
    """Each count rounded up to a multiple of ``align``; an expert with no tokens stays at 0."""
    return (tokens_per_expert_E + align - 1) // align * align


def local_padding_rows(tokens_per_expert_E: torch.Tensor, align: int) -> int:
    """Rows the expert GEMM computes on top of the true assignments (never communicated)."""
    return int((padded_tokens_per_expert(tokens_per_expert_E, align) - tokens_per_expert_E).sum())
