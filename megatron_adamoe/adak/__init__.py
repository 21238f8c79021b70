"""Ada-K routing (Yue et al., ICLR 2025): per-layer allocators choose each token's number of
experts on a frozen MoE model, trained with PPO. See docs/ada-k.md."""

from megatron_adamoe.adak.allocator import KAllocator, choose_k, expected_k, log_prob
from megatron_adamoe.adak.model import AdaK, moe_blocks
from megatron_adamoe.adak.trainer import AdaKOptions, AdaKTrainer

__all__ = [
    "AdaK",
    "AdaKOptions",
    "AdaKTrainer",
    "KAllocator",
    "choose_k",
    "expected_k",
    "log_prob",
    "moe_blocks",
]
