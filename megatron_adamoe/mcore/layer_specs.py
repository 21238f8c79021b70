"""GPT layer and decoder-block specs with AdaMoE layers, mirroring Megatron-Core's spec helpers.

Each helper builds the stock spec and swaps its MoE module for :class:`AdaMoELayer` with an
:class:`AdaMoERouter`; everything else (attention, norms, dense MLPs, experts) stays upstream's.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
)
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import WrappedTorchNorm

from megatron_adamoe.errors import OptionError
from megatron_adamoe.mcore._compat import moe_module_class, moe_submodules, replace_moe_module
from megatron_adamoe.mcore.config import AdaMoEConfig
from megatron_adamoe.mcore.moe_layer import AdaMoELayer
from megatron_adamoe.mcore.norms import SequenceParallelTorchNorm
from megatron_adamoe.mcore.router import AdaMoERouter


def to_adamoe_moe_spec(moe_spec):
    """A stock MoELayer spec (a ModuleSpec up to megatron-core 0.16, a partial from 0.17) -> the
    same spec with AdaMoELayer and AdaMoERouter."""
    module = moe_module_class(moe_spec)
    assert module is MoELayer, f"expected a MoELayer spec, got {module}"
    submodules = dataclasses.replace(moe_submodules(moe_spec), router=AdaMoERouter)
    return replace_moe_module(moe_spec, AdaMoELayer, submodules)


def to_adamoe_layer_spec(layer_spec: ModuleSpec) -> ModuleSpec:
    """A TransformerLayer spec whose MLP is a MoELayer -> the AdaMoE version; PyTorch norms
    (the local spec without Apex) -> ``SequenceParallelTorchNorm``; all else unchanged.

    The local spec saves ``pre_mlp_layernorm`` under TE's fused name
    ``mlp.linear_fc1.layer_norm_weight``, which TE's own MoE layers do not use (their pre-MLP
    norm is a separate ``pre_mlp_layernorm``): for MoE layers that entry of the key map is
    dropped, so CPU (local spec) and GPU (TE spec) checkpoints hold the same keys."""
    submodules = layer_spec.submodules
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(submodules, name, None) is WrappedTorchNorm:
            submodules = dataclasses.replace(submodules, **{name: SequenceParallelTorchNorm})
    mlp = getattr(submodules, "mlp", None)
    if moe_module_class(mlp) is MoELayer:
        keys_map = {
            old: new
            for old, new in submodules.sharded_state_dict_keys_map.items()
            if old != "pre_mlp_layernorm."
        }
        submodules = dataclasses.replace(
            submodules, mlp=to_adamoe_moe_spec(mlp), sharded_state_dict_keys_map=keys_map
        )
    return dataclasses.replace(layer_spec, submodules=submodules)


def get_adamoe_gpt_layer_spec(
    num_experts: int,
    use_transformer_engine: bool = False,
    moe_grouped_gemm: bool = False,
    qk_layernorm: bool = False,
    normalization: Optional[str] = None,
    **kwargs,
) -> ModuleSpec:
    """Mirrors ``get_gpt_layer_local_spec`` / ``get_gpt_layer_with_transformer_engine_spec``.

    ``use_transformer_engine=True`` needs Transformer Engine (GPU); it is imported only then.
    Extra keyword arguments go to the upstream helper unchanged.
    """
    if not num_experts:
        raise OptionError(
            f"num_experts ({num_experts!r}) must be a positive integer; an AdaMoE layer spec "
            "needs the number of true experts (config.num_moe_experts)"
        )
    if use_transformer_engine:
        _require_transformer_engine()
        from megatron.core.models.gpt.gpt_layer_specs import (
            get_gpt_layer_with_transformer_engine_spec,
        )

        stock = get_gpt_layer_with_transformer_engine_spec(
            num_experts=num_experts,
            moe_grouped_gemm=moe_grouped_gemm,
            qk_layernorm=qk_layernorm,
            **kwargs,
        )
    else:
        stock = get_gpt_layer_local_spec(
            num_experts=num_experts,
            moe_grouped_gemm=moe_grouped_gemm,
            qk_layernorm=qk_layernorm,
            normalization=normalization,
            **kwargs,
        )
    return to_adamoe_layer_spec(stock)


def get_adamoe_gpt_decoder_block_spec(
    config: AdaMoEConfig,
    use_transformer_engine: bool = False,
    normalization: Optional[str] = None,
    **kwargs,
):
    """Mirrors ``get_gpt_decoder_block_spec``: dense and AdaMoE layers per ``moe_layer_freq``,
    sliced to this pipeline stage."""
    if not isinstance(config, AdaMoEConfig):
        raise TypeError(f"expected an AdaMoEConfig, got {type(config).__name__}")
    if use_transformer_engine:
        _require_transformer_engine()
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine, normalization=normalization, **kwargs
    )
    block.layer_specs = [to_adamoe_layer_spec(spec) for spec in block.layer_specs]
    if block.layer_norm is WrappedTorchNorm:
        block.layer_norm = SequenceParallelTorchNorm
    return block


def _require_transformer_engine() -> None:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        raise ImportError(
            "use_transformer_engine=True needs Transformer Engine (a GPU extra: "
            "`pip install megatron-adamoe[gpu]`); use the local spec on CPU"
        ) from None
