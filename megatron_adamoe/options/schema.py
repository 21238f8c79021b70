"""The pretraining options: Megatron's argument names (new ones start with ``adamoe_``), each with
its default and a one-line doc. The single source of ``--help``, ``docs/options.md`` and the
checks in ``options.rules``. Torch-free."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional, Union

from megatron_adamoe.options import vocab


def opt(default, doc: str, group: str):
    return field(default=default, metadata={"doc": doc, "group": group})


# The groups of --help and docs/options.md.
MODEL, MOE, FP8, ADAMOE, PARALLEL = "model", "MoE", "FP8 (GPU)", "AdaMoE", "parallelism"
OPTIMISATION, DATA, CHECKPOINTS = "optimisation", "data", "checkpoints"
LOGGING, FAULTS = "logging and evaluation", "faults"


@dataclass
class PretrainArguments:
    num_layers: int = opt(4, "transformer layers", MODEL)
    hidden_size: int = opt(128, "model width", MODEL)
    ffn_hidden_size: Optional[int] = opt(None, "dense FFN width (null: 4 x hidden_size)", MODEL)
    num_attention_heads: int = opt(4, "attention heads", MODEL)
    num_query_groups: Optional[int] = opt(None, "key/value heads (GQA; null: one per head)", MODEL)
    seq_length: int = opt(128, "tokens per sample", MODEL)
    max_position_embeddings: Optional[int] = opt(None, "positions (null: seq_length)", MODEL)
    position_embedding_type: str = opt("rope", "one of rope, learned_absolute", MODEL)
    rotary_base: int = opt(10000, "RoPE base", MODEL)
    normalization: str = opt("RMSNorm", "RMSNorm or LayerNorm", MODEL)
    norm_epsilon: float = opt(1e-5, "norm epsilon", MODEL)
    swiglu: bool = opt(True, "SwiGLU FFNs and experts (else GELU)", MODEL)
    untie_embeddings_and_output_weights: bool = opt(True, "separate output layer", MODEL)
    hidden_dropout: float = opt(0.0, "dropout after attention and MLP", MODEL)
    attention_dropout: float = opt(0.0, "dropout of attention probabilities", MODEL)
    init_method_std: float = opt(0.02, "std of the normal weight initialisation", MODEL)
    make_vocab_size_divisible_by: int = opt(
        128, "pad the vocabulary to a multiple of this x TP", MODEL
    )
    num_experts: int = opt(
        4, "n, true experts per MoE layer; 0: a dense model (every MLP of ffn_hidden_size)", MOE
    )
    moe_ffn_hidden_size: Optional[int] = opt(None, "expert FFN width (null: ffn_hidden_size)", MOE)
    moe_router_topk: int = opt(2, "k, picks per token over the n true + m null experts", MOE)
    moe_layer_freq: Union[int, list] = opt(1, "every freq-th layer is MoE, or a 0/1 list", MOE)
    moe_aux_loss_coeff: Optional[float] = opt(
        None, "load-balancing loss coefficient per layer (null: 0.01; 0 under a schedule)", MOE
    )
    moe_router_load_balancing_type: str = opt("aux_loss", "aux_loss or none", MOE)
    moe_router_score_function: str = opt("softmax", "softmax; sigmoid for stock top-k (m = 0)", MOE)
    moe_router_enable_expert_bias: bool = opt(
        False, "aux-loss-free balancing of the true experts (Megatron's expert bias)", MOE
    )
    moe_router_bias_update_rate: float = opt(1e-3, "expert-bias step per global batch", MOE)
    moe_z_loss_coeff: Optional[float] = opt(None, "router z-loss coefficient", MOE)
    moe_router_dtype: Optional[str] = opt("fp32", "router logits dtype: fp32, fp64 or null", MOE)
    moe_token_dispatcher_type: str = opt("alltoall", "alltoall, allgather or flex (DeepEP)", MOE)
    moe_grouped_gemm: bool = opt(False, "Transformer Engine grouped-GEMM experts (GPU)", MOE)
    moe_permute_fusion: bool = opt(False, "fused token permutation (GPU)", MOE)
    fp8_format: Optional[str] = opt(None, "FP8 GEMMs: e4m3 or hybrid; null = off", FP8)
    fp8_recipe: str = opt("delayed", "delayed, tensorwise, blockwise or mxfp8", FP8)
    adamoe_num_null_experts: int = opt(0, "m, null experts (0: stock top-k)", ADAMOE)
    adamoe_null_expert_type: str = opt("zero", "zero (paper) or identity (adds s x)", ADAMOE)
    adamoe_weight_norm: str = opt(
        "true_experts", "true_experts (paper), all_selected or none", ADAMOE
    )
    adamoe_aux_loss_coeff_schedule: Optional[str] = opt(
        None,
        "coefficient over steps: constant:C | piecewise:C0,S1:C1 | linear:A,B,END[,START]",
        ADAMOE,
    )
    adamoe_flops_baseline_topk: Optional[int] = opt(
        None, "the k the logged FLOPs ratio compares with (null: moe_router_topk)", ADAMOE
    )
    adamoe_target_load: Optional[Union[float, list]] = opt(
        None, "true experts per token the controller holds (one, or one per MoE layer)", ADAMOE
    )
    adamoe_target_load_schedule: Optional[str] = opt(
        None, "the target over steps (schedule grammar), instead of a constant", ADAMOE
    )
    adamoe_load_controller_rate: Optional[float] = opt(
        None,
        "null: the null bias solves for each batch's target load; a number (expert override): "
        "its step per unit of load error",
        ADAMOE,
    )
    adamoe_router_mode: str = opt(
        "topk", "topk, or topp (smallest set reaching p, at most k)", ADAMOE
    )
    adamoe_topp_threshold: Optional[float] = opt(None, "p of top-p routing, in (0, 1]", ADAMOE)
    tensor_model_parallel_size: int = opt(1, "TP", PARALLEL)
    pipeline_model_parallel_size: int = opt(1, "PP", PARALLEL)
    expert_model_parallel_size: int = opt(1, "EP (shards the true experts)", PARALLEL)
    expert_tensor_parallel_size: Optional[int] = opt(None, "expert TP (null: TP)", PARALLEL)
    context_parallel_size: int = opt(1, "CP (GPU)", PARALLEL)
    sequence_parallel: bool = opt(False, "sequence parallelism (required with TP > 1)", PARALLEL)
    use_distributed_optimizer: bool = opt(False, "shard optimizer state over DP (GPU)", PARALLEL)
    micro_batch_size: int = opt(4, "samples per micro-batch per rank", OPTIMISATION)
    global_batch_size: Optional[int] = opt(
        None, "samples per step (null: micro x DP)", OPTIMISATION
    )
    train_iters: int = opt(100, "training steps", OPTIMISATION)
    lr: float = opt(1e-3, "peak learning rate", OPTIMISATION)
    min_lr: float = opt(0.0, "final learning rate", OPTIMISATION)
    lr_decay_style: str = opt(
        "cosine", "constant, linear, cosine, inverse-square-root", OPTIMISATION
    )
    lr_warmup_iters: int = opt(0, "linear warm-up steps", OPTIMISATION)
    lr_decay_iters: Optional[int] = opt(None, "decay steps (null: train_iters)", OPTIMISATION)
    weight_decay: float = opt(0.01, "AdamW weight decay", OPTIMISATION)
    adam_beta1: float = opt(0.9, "Adam beta1", OPTIMISATION)
    adam_beta2: float = opt(0.95, "Adam beta2", OPTIMISATION)
    adam_eps: float = opt(1e-8, "Adam epsilon", OPTIMISATION)
    clip_grad: float = opt(1.0, "gradient-norm clip", OPTIMISATION)
    bf16: bool = opt(False, "bf16 training (GPU; ignored on CPU)", OPTIMISATION)
    seed: int = opt(
        1234, "initialisation seed (and data order unless adamoe_data_seed)", OPTIMISATION
    )
    data_path: Optional[list] = opt(None, "indexed dataset prefix(es), optionally weighted", DATA)
    split: str = opt("98,2,0", "train,valid,test weights", DATA)
    adamoe_data_seed: Optional[int] = opt(None, "shuffles the data (null: seed)", DATA)
    tokenizer_model: Optional[str] = opt(None, "sentencepiece .model file", DATA)
    data_cache_path: Optional[str] = opt(None, "dataset index cache (null: next to the data)", DATA)
    save: Optional[str] = opt(None, "checkpoint directory (the run resumes from it)", CHECKPOINTS)
    load: Optional[str] = opt(None, "checkpoint to start from when save has none", CHECKPOINTS)
    save_interval: Optional[int] = opt(None, "steps between saves", CHECKPOINTS)
    exit_interval: Optional[int] = opt(None, "save and stop when step % this == 0", CHECKPOINTS)
    finetune: bool = opt(False, "load weights only, from step 0", CHECKPOINTS)
    no_load_optim: bool = opt(False, "do not restore the optimizer state", CHECKPOINTS)
    no_load_rng: bool = opt(False, "do not restore the RNG states", CHECKPOINTS)
    log_interval: int = opt(10, "steps between iteration lines", LOGGING)
    eval_interval: Optional[int] = opt(None, "steps between validations", LOGGING)
    eval_iters: int = opt(10, "global batches of the fixed validation set", LOGGING)
    skip_train: bool = opt(False, "load, evaluate once, exit", LOGGING)
    tensorboard_dir: Optional[str] = opt(None, "TensorBoard event directory", LOGGING)
    wandb_project: Optional[str] = opt(None, "W&B project (needs wandb)", LOGGING)
    adamoe_metrics_file: Optional[str] = opt(
        None, "JSON lines: one per step and validation", LOGGING
    )
    exit_signal_handler: bool = opt(True, "on SIGTERM: finish the step, save, exit 0", FAULTS)
    adamoe_loss_spike_factor: float = opt(
        3.0, "stop if loss > factor x recent mean; 0 = off", FAULTS
    )
    adamoe_loss_spike_window: int = opt(20, "losses in that recent mean", FAULTS)
    adamoe_min_load: float = opt(
        0.01, "stop if an MoE layer's load stays below (see next); 0 = off", FAULTS
    )
    adamoe_min_load_steps: int = opt(
        10, "consecutive steps under adamoe_min_load that stop the run", FAULTS
    )
    adamoe_dead_grad_steps: int = opt(
        5,
        "stop after this many steps in a row with gradient norm 0 (a dead model); 0 = off",
        FAULTS,
    )
    # --- filled in by load_arguments, not settable ---
    world_size: int = field(default=1, metadata={"derived": True})

    @property
    def data_parallel_size(self) -> int:
        model_parallel = (
            self.tensor_model_parallel_size
            * self.pipeline_model_parallel_size
            * self.context_parallel_size
        )
        return max(1, self.world_size // model_parallel)

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def moe_layer_indices(self) -> list[int]:
        if self.is_dense:
            return []
        return vocab.moe_layer_indices(self.num_layers, self.moe_layer_freq)

    @property
    def is_dense(self) -> bool:
        """num_experts 0: no MoE layer (the dense twin of an MoE family, e.g. a Mo-LoRA base)."""
        return self.num_experts == 0

    def padded_vocab_size(self, vocab_size: int) -> int:
        return vocab.padded_vocab_size(
            vocab_size, self.make_vocab_size_divisible_by, self.tensor_model_parallel_size
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if _settable(f)}


CHOICES = {
    "position_embedding_type": vocab.POSITION_EMBEDDINGS,
    "normalization": vocab.NORMALIZATIONS,
    "lr_decay_style": vocab.LR_DECAY_STYLES,
    "moe_router_dtype": vocab.ROUTER_DTYPES,
    "moe_token_dispatcher_type": vocab.DISPATCHER_TYPES,
    "adamoe_null_expert_type": vocab.NULL_EXPERT_TYPES,
    "adamoe_weight_norm": vocab.WEIGHT_NORMS,
    "fp8_format": vocab.FP8_FORMATS,
    "fp8_recipe": vocab.FP8_RECIPES,
    "moe_router_load_balancing_type": vocab.LOAD_BALANCING_TYPES,
    "moe_router_score_function": vocab.SCORE_FUNCTIONS,
    "adamoe_router_mode": vocab.ROUTER_MODES,
}


def _settable(f: dataclasses.Field) -> bool:
    return not f.metadata.get("derived", False)


def settable_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(PretrainArguments) if _settable(f)}


def describe(markdown: bool = True) -> str:
    """Every option with its default and doc: a markdown table per group (docs/options.md), or
    plain lines (``--help``)."""
    groups: dict[str, list] = {}
    for f in settable_fields().values():
        groups.setdefault(f.metadata["group"], []).append(f)
    lines = []
    for group, fields in groups.items():
        if markdown:
            lines += [f"## {group}", "", "| option | default | meaning |", "|---|---|---|"]
            lines += [
                f"| `{f.name}` | `{_show(f.default)}` | {f.metadata['doc']} |" for f in fields
            ]
            lines.append("")
        else:
            lines.append(f"{group}:")
            lines += [
                f"  --{f.name.replace('_', '-'):<40} {f.metadata['doc']} "
                f"(default {_show(f.default)})"
                for f in fields
            ]
    return "\n".join(lines)


def _show(value) -> str:
    return (
        "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    )
