"""A PyTorch norm for Megatron-Core specs that also works under sequence parallelism (CPU)."""

from __future__ import annotations

import torch
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_adamoe.errors import OptionError


class SequenceParallelTorchNorm:
    """Mirrors ``WrappedTorchNorm`` (the local spec's norm without Apex), minus its refusal of
    ``sequence_parallel``.

    Under sequence parallelism each tensor-parallel rank normalises its own slice of the
    sequence, so the norm weights' gradients are partial sums over the sequence. Apex's and TE's
    norms mark their weights ``sequence_parallel = True`` and Megatron's ``finalize_model_grads``
    then all-reduces those gradients over the TP group; this norm marks its weights the same
    way. Without sequence parallelism it is ``WrappedTorchNorm`` itself.
    """

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ):
        if not config.sequence_parallel:
            return WrappedTorchNorm(
                config, hidden_size, eps, persist_layer_norm, zero_centered_gamma, normalization
            )
        if (
            config.layernorm_zero_centered_gamma
            or config.persist_layer_norm
            or (config.memory_efficient_layer_norm)
        ):
            raise OptionError(
                "normalization options zero-centered gamma, persist_layer_norm and "
                "memory_efficient_layer_norm must be off for PyTorch norms; they "
                "need Apex or Transformer Engine"
            )
        norm_classes = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in norm_classes:
            raise OptionError(
                f"normalization ({config.normalization!r}) must be 'LayerNorm' or "
                "'RMSNorm' under sequence parallelism"
            )
        norm = norm_classes[config.normalization](normalized_shape=hidden_size, eps=eps)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", True)
        return norm
