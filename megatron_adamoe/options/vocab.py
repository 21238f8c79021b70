"""Every vocabulary of AdaMoE's options, once, and the rules more than one layer applies.

Torch-free. ops/, mcore/, training/, hf/ and tools/ import these. The routing vocabularies (null
types, weight norms, router modes) are defined with the routing rules in ``routing_rules``, whose
generated copy the standalone HF configuration carries; tests/unit/test_options.py holds the
modeling file's router dtypes equal to these.
"""

from __future__ import annotations

from megatron_adamoe.errors import OptionError
from megatron_adamoe.options.routing_rules import (  # noqa: F401  (defined there, with the rules)
    NULL_EXPERT_TYPES,
    ROUTER_MODES,
    WEIGHT_NORMS,
)

LOAD_BALANCING_TYPES = ("aux_loss", "none")
SCORE_FUNCTIONS = ("softmax", "sigmoid")
ROUTER_DTYPES = (None, "fp32", "fp64")  # Megatron's moe_router_dtype
ROUTER_DTYPE_TO_HF = {None: None, "fp32": "float32", "fp64": "float64"}  # HF's router_dtype
ROUTER_DTYPE_FROM_HF = {hf: megatron for megatron, hf in ROUTER_DTYPE_TO_HF.items()}
FP8_FORMATS = (None, "e4m3", "hybrid")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
DISPATCHER_TYPES = ("alltoall", "allgather", "flex")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
LR_DECAY_STYLES = ("constant", "linear", "cosine", "inverse-square-root")


def moe_layer_pattern(num_layers: int, moe_layer_freq) -> list[int]:
    """1 for an MoE layer, 0 for a dense one (Megatron's moe_layer_freq rule: every freq-th
    layer from layer 0, or an explicit 0/1 list)."""
    if isinstance(moe_layer_freq, list):
        return list(moe_layer_freq)
    return [int(i % moe_layer_freq == 0) for i in range(num_layers)]


def moe_layer_indices(num_layers: int, moe_layer_freq) -> list[int]:
    """0-based indices of the MoE layers."""
    return [i for i, is_moe in enumerate(moe_layer_pattern(num_layers, moe_layer_freq)) if is_moe]


def padded_vocab_size(vocab_size: int, divisible_by: int, tensor_parallel_size: int) -> int:
    """Megatron's rule: round the vocabulary up to a multiple of divisor x TP size."""
    multiple = divisible_by * tensor_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def check_expert_parallel(num_experts: int, ep_size: int, experts_field: str) -> None:
    """EP shards the n true experts; ``experts_field`` names n as the caller spells it
    (``num_experts`` in the options, ``num_moe_experts`` in AdaMoEConfig)."""
    if num_experts % ep_size:
        raise OptionError(
            f"{experts_field} ({num_experts}) must be divisible by expert_model_parallel_size "
            f"({ep_size}); change the expert count or the EP size (EP shards the true experts; "
            "null experts live in the router)"
        )
