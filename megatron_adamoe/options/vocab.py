"""Every vocabulary of AdaMoE's options, once, and the rules more than one layer applies.

Torch-free. ops/, mcore/, training/, hf/ and tools/ import these; the standalone HF remote-code
files (hf/configuration_adamoe.py, hf/modeling_adamoe.py) keep copies of their own, which
tests/unit/test_options.py holds equal to these.
"""

from __future__ import annotations

from megatron_adamoe.errors import OptionError

NULL_EXPERT_TYPES = ("zero", "identity")
WEIGHT_NORMS = ("true_experts", "all_selected", "none")
ROUTER_MODES = ("topk", "topp")
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


def check_expert_counts(
    num_experts: int,
    num_null_experts: int,
    topk: int,
    ep_size: int,
    experts_field: str = "num_experts",
) -> None:
    """k picks over n + m, and EP sharding the n true experts; ``experts_field`` names n as the
    caller spells it (``num_experts`` in the options, ``num_moe_experts`` in AdaMoEConfig)."""
    total = num_experts + num_null_experts
    if not isinstance(topk, int) or isinstance(topk, bool) or not 1 <= topk <= total:
        raise OptionError(
            f"moe_router_topk ({topk!r}) must be an integer in [1, {experts_field} + "
            f"adamoe_num_null_experts = {total}]; lower it or add null experts (k counts picks "
            "over true and null experts)"
        )
    if num_experts % ep_size:
        raise OptionError(
            f"{experts_field} ({num_experts}) must be divisible by expert_model_parallel_size "
            f"({ep_size}); change the expert count or the EP size (EP shards the true experts; "
            "null experts live in the router)"
        )
