"""Build the AdaMoE GPT model from pretraining arguments, on Megatron-Core's own classes.

``adamoe_num_null_experts: 0`` is the top-k baseline: the AdaMoE router with m = 0 computes
exactly what the stock TopKRouter / MoELayer compute (tests/unit/test_matches_stock_topk.py
checks every output and gradient bit for bit), so both arms of a comparison share one code path
and log the same metrics.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_adamoe.errors import OptionError
from megatron_adamoe.mcore import AdaMoEConfig, get_adamoe_gpt_decoder_block_spec
from megatron_adamoe.options import PretrainArguments


def layer_spec_backend(args: PretrainArguments, on_gpu: bool, has_te: bool) -> str:
    """ "transformer_engine" (TE attention, norms and linears; ``TEGroupedMLP`` experts under
    ``moe_grouped_gemm``) or "local" (Megatron's own modules; ``SequentialMLP`` experts).

    TE whenever it can run (a GPU with TE installed), as Megatron-LM picks it; FP8 and grouped
    GEMMs need it, so asking for them without it fails with one line."""
    if on_gpu and has_te:
        return "transformer_engine"
    if on_gpu:
        for name in ("fp8_format", "moe_grouped_gemm"):
            if getattr(args, name):
                raise OptionError(
                    f"{name} ({getattr(args, name)!r}) must be off without "
                    "Transformer Engine; install it (pip install "
                    "megatron-adamoe[gpu]) or drop the option"
                )
    return "local"


def check_device_support(
    args: PretrainArguments, on_gpu: bool, capability: Optional[tuple] = None
) -> None:
    """Options that need a GPU stack, rejected up front on CPU; on GPU, FP8 recipes the device
    cannot run (``capability``: the CUDA compute capability, read from the device if None)."""
    if on_gpu:
        if args.fp8_format and args.fp8_recipe in ("blockwise", "mxfp8"):
            needed = (9, 0) if args.fp8_recipe == "blockwise" else (10, 0)
            capability = capability or torch.cuda.get_device_capability()
            if tuple(capability) < needed:
                raise OptionError(
                    f"fp8_recipe ({args.fp8_recipe!r}) must run on compute capability "
                    f"{needed[0]}.{needed[1]}+ (this GPU: {capability[0]}.{capability[1]}); use "
                    "'delayed' or 'tensorwise'"
                )
        return
    if args.fp8_format:
        raise OptionError(
            f"fp8_format ({args.fp8_format!r}) must be null on CPU; FP8 GEMMs are "
            "Transformer Engine's (GPU only)"
        )
    if args.use_distributed_optimizer:
        raise OptionError(
            "use_distributed_optimizer (True) must be false on CPU; Megatron's distributed "
            "optimizer checkpoints its state through Apex or Transformer Engine (GPU only)"
        )
    if args.context_parallel_size > 1:
        raise OptionError(
            f"context_parallel_size ({args.context_parallel_size}) must be 1 on CPU; context "
            "parallel attention is Transformer Engine's (GPU only)"
        )
    if args.moe_token_dispatcher_type == "flex":
        raise OptionError(
            "moe_token_dispatcher_type ('flex') must be 'alltoall' or 'allgather' on "
            "CPU; the flex dispatcher runs on DeepEP (GPU only)"
        )
    if args.pipeline_model_parallel_size > 1 and not args.untie_embeddings_and_output_weights:
        raise OptionError(
            "untie_embeddings_and_output_weights (False) must be true on CPU with "
            "pipeline stages; Megatron syncs tied embeddings across stages on CUDA"
        )
    for name in ("moe_grouped_gemm", "moe_permute_fusion"):
        if getattr(args, name):
            raise OptionError(
                f"{name} (True) must be false on CPU; it needs Transformer Engine "
                "or grouped_gemm kernels (GPU only)"
            )


def transformer_config(args: PretrainArguments, on_gpu: bool) -> AdaMoEConfig:
    """The run's AdaMoEConfig. Megatron-Core's own checks in TransformerConfig raise a plain
    ValueError; for these options they are the user's to fix, so they become OptionErrors."""
    try:
        return _transformer_config(args, on_gpu)
    except OptionError:
        raise
    except ValueError as error:
        raise OptionError(f"Megatron-Core rejects these options: {error}") from None


def _transformer_config(args: PretrainArguments, on_gpu: bool) -> AdaMoEConfig:
    bf16 = args.bf16 and on_gpu
    return AdaMoEConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size or 4 * args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        num_moe_experts=args.num_experts or None,  # 0: dense (Megatron's None)
        moe_ffn_hidden_size=None
        if args.is_dense  # Megatron's dense model; its other moe_* settings go unused
        else args.moe_ffn_hidden_size or args.ffn_hidden_size or 4 * args.hidden_size,
        moe_router_topk=args.moe_router_topk,
        # Megatron's name for adamoe_weight_norm "none" (it requires it with top-1)
        moe_router_pre_softmax=args.adamoe_weight_norm == "none",
        moe_layer_freq=args.moe_layer_freq,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_router_dtype=args.moe_router_dtype,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_router_bias_update_rate=args.moe_router_bias_update_rate,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_grouped_gemm=args.moe_grouped_gemm,
        moe_permute_fusion=args.moe_permute_fusion,
        fp8=args.fp8_format if on_gpu else None,
        fp8_recipe=args.fp8_recipe,
        adamoe_num_null_experts=args.adamoe_num_null_experts,
        adamoe_null_expert_type=args.adamoe_null_expert_type,
        adamoe_weight_norm=args.adamoe_weight_norm,
        adamoe_aux_loss_coeff_schedule=args.adamoe_aux_loss_coeff_schedule,
        adamoe_target_load=args.adamoe_target_load,
        adamoe_target_load_schedule=args.adamoe_target_load_schedule,
        adamoe_load_controller_rate=args.adamoe_load_controller_rate,
        adamoe_router_mode=args.adamoe_router_mode,
        adamoe_topp_threshold=args.adamoe_topp_threshold,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not on_gpu,
        batch_p2p_sync=on_gpu,  # its torch.cuda.synchronize() guards NCCL batch p2p only
    )


def build_model(
    args: PretrainArguments, config: AdaMoEConfig, vocab_size: int, on_gpu: Optional[bool] = None
) -> GPTModel:
    """The GPTModel chunk of this pipeline stage (no virtual pipeline stages); on GPU (default:
    when CUDA is available) with Transformer Engine's spec when it is installed."""
    on_gpu = torch.cuda.is_available() if on_gpu is None else on_gpu
    backend = layer_spec_backend(args, on_gpu, on_gpu and _has_transformer_engine())
    block_spec = get_adamoe_gpt_decoder_block_spec(
        config,
        use_transformer_engine=backend == "transformer_engine",
        normalization=args.normalization,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=block_spec,
        vocab_size=args.padded_vocab_size(vocab_size),
        max_sequence_length=args.max_position_embeddings or args.seq_length,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
    )
    if on_gpu:
        model.cuda(torch.cuda.current_device())
    return model


def _has_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True
