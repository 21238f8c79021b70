"""Every rule the pretraining options must satisfy, each failing with one line,
``<field> (<value>) must <rule>; <fix>``. Torch-free; the data and directory checks read files.

``validate`` checks and changes nothing; ``resolve`` returns the run's effective options (the
defaults that depend on other options filled in). ``check_adamoe`` holds the AdaMoE rules of a
Megatron run, which ``validate`` and Megatron's ``AdaMoEConfig`` both call; its routing part
(``routing_rules``) is shared with the Hugging Face configuration too."""

from __future__ import annotations

import dataclasses
import os

from megatron_adamoe.data import indexed
from megatron_adamoe.errors import OptionError
from megatron_adamoe.options import vocab
from megatron_adamoe.options.routing_rules import ROUTING_NAMES, routing_violation
from megatron_adamoe.options.schedule import StepSchedule
from megatron_adamoe.options.schema import CHOICES, PretrainArguments
from megatron_adamoe.storage import check_writable

POSITIVE = (
    "num_layers hidden_size num_attention_heads seq_length moe_router_topk "
    "tensor_model_parallel_size pipeline_model_parallel_size expert_model_parallel_size "
    "context_parallel_size micro_batch_size train_iters log_interval eval_iters "
    "make_vocab_size_divisible_by adamoe_loss_spike_window adamoe_min_load_steps"
).split()
OPTIONAL_POSITIVE = (
    "ffn_hidden_size num_query_groups max_position_embeddings moe_ffn_hidden_size "
    "expert_tensor_parallel_size global_batch_size save_interval eval_interval "
    "lr_decay_iters adamoe_flops_baseline_topk exit_interval"
).split()
NON_NEGATIVE = (
    "num_experts adamoe_num_null_experts lr min_lr lr_warmup_iters weight_decay clip_grad "
    "adamoe_loss_spike_factor adamoe_min_load moe_router_bias_update_rate adamoe_dead_grad_steps"
).split()
# Checked by check_adamoe (the routing rules and the aux loss), not by the loops below.
ADAMOE_CHECKED = {*ROUTING_NAMES["options"].values(), "moe_router_load_balancing_type"}


def resolve(args: PretrainArguments) -> PretrainArguments:
    """The run's effective options, a new object: ``moe_aux_loss_coeff`` (null: 0.01, or 0 under
    ``adamoe_aux_loss_coeff_schedule``) and ``global_batch_size`` (null: one micro-batch per
    data-parallel rank) filled in, and ``tokenizer_model`` made absolute (checkpoints record it,
    and tools that read them run from anywhere)."""
    coeff = args.moe_aux_loss_coeff
    if coeff is None:
        coeff = 0.0 if args.adamoe_aux_loss_coeff_schedule else 0.01
    batch = args.global_batch_size or args.micro_batch_size * args.data_parallel_size
    tokenizer = args.tokenizer_model and os.path.abspath(args.tokenizer_model)
    return dataclasses.replace(
        args, moe_aux_loss_coeff=coeff, global_batch_size=batch, tokenizer_model=tokenizer
    )


def validate(args: PretrainArguments, check_io: bool = True, check_topology: bool = True) -> None:
    """Every rule; changes nothing. Converters skip ``check_io`` (data, tokenizer and checkpoint
    paths: a later run supplies them) and, reading a saved config, ``check_topology`` (the world
    size)."""

    def fail(name: str, rule: str, fix: str) -> None:
        raise OptionError(f"{name} ({getattr(args, name)!r}) must {rule}; {fix}")

    for name, choices in CHOICES.items():
        if name not in ADAMOE_CHECKED and getattr(args, name) not in choices:
            fail(name, f"be one of {', '.join(map(repr, choices))}", "pick one of them")
    for name in POSITIVE:
        if name not in ADAMOE_CHECKED and getattr(args, name) <= 0:
            fail(name, "be > 0", "set a positive value")
    for name in OPTIONAL_POSITIVE:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(name, "be > 0 when set", "set a positive value or drop the key")
    for name in NON_NEGATIVE:
        if name not in ADAMOE_CHECKED and getattr(args, name) < 0:
            fail(name, "be >= 0", "set a non-negative value")
    for name in ("seed", "adamoe_data_seed"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < 2**32:
            fail(name, "be in [0, 2**32)", "pick a non-negative 32-bit seed")
    if 0 < args.adamoe_loss_spike_factor <= 1:
        fail(
            "adamoe_loss_spike_factor",
            "be > 1 (or 0 to turn the guard off)",
            "a loss at most its recent mean is no spike; e.g. 3",
        )
    _validate_moe(args, fail)
    if args.is_dense:
        _validate_dense(args, fail)
    elif args.adamoe_min_load >= min(args.moe_router_topk, args.num_experts):
        fail(
            "adamoe_min_load",
            f"be < the most true experts a token can use "
            f"({min(args.moe_router_topk, args.num_experts)})",
            "e.g. 0.01, or 0 to turn it off",
        )
    if args.norm_epsilon <= 0:
        fail("norm_epsilon", "be > 0", "set a small positive value such as 1e-5")
    if args.fp8_format and not args.bf16:
        fail(
            "fp8_format",
            "come with bf16 (FP8 GEMMs keep bf16 weights and activations)",
            "add --bf16",
        )
    if check_topology:
        _validate_topology(args, fail)
    if check_io:
        _validate_io(args, fail)


def check_adamoe(settings, spelling: str, num_moe_layers: int) -> None:
    """The AdaMoE rules of a Megatron run, for the pretraining options (``spelling``
    "options") and AdaMoEConfig ("megatron"), which spell the fields alike but for n: the routing
    rules (``routing_rules``), EP sharding, k = 1, the score function, the load-balancing loss
    and its schedule, the load controller's target schedule and rate."""
    problem = routing_violation(settings, spelling, num_moe_layers)
    if problem:
        raise OptionError(problem)
    n_field = ROUTING_NAMES[spelling]["num_experts"]
    n, m, k = getattr(settings, n_field), settings.adamoe_num_null_experts, settings.moe_router_topk
    vocab.check_expert_parallel(n, settings.expert_model_parallel_size, n_field)
    if k == 1 and settings.adamoe_weight_norm != "none":
        raise OptionError(
            f"adamoe_weight_norm ({settings.adamoe_weight_norm!r}) must be 'none' when "
            "moe_router_topk is 1; set adamoe_weight_norm='none' (one renormalised pick has "
            "weight 1: no router gradient)"
        )
    score = settings.moe_router_score_function
    if score != "softmax" and (m or settings.adamoe_router_mode != "topk"):
        raise OptionError(
            f"moe_router_score_function ({score!r}) must be 'softmax' with null experts or "
            "top-p; null experts are defined on a softmax over true + null experts (sigmoid is "
            "stock top-k: m = 0)"
        )
    _check_aux_loss(settings)
    _check_load_control(settings, min(k, n))


def _check_aux_loss(settings) -> None:
    balancing = settings.moe_router_load_balancing_type
    if balancing not in vocab.LOAD_BALANCING_TYPES:
        raise OptionError(
            f"moe_router_load_balancing_type ({balancing!r}) must be one of "
            f"{vocab.LOAD_BALANCING_TYPES}; AdaMoE applies its null-aware loss as 'aux_loss'"
        )
    coeff = settings.moe_aux_loss_coeff  # None in the options: resolve() fills it in
    if coeff is not None and (
        isinstance(coeff, (list, tuple, bool)) or not isinstance(coeff, (int, float)) or coeff < 0
    ):
        raise OptionError(
            f"moe_aux_loss_coeff ({coeff!r}) must be one number >= 0; AdaMoE has a single "
            "load-balancing loss"
        )
    schedule = settings.adamoe_aux_loss_coeff_schedule
    if schedule is None:
        return
    StepSchedule.parse(schedule)  # raises a one-line OptionError naming the field
    if balancing == "none":
        raise OptionError(
            f"adamoe_aux_loss_coeff_schedule ({schedule!r}) must be unset when "
            "moe_router_load_balancing_type is 'none'; set the type to 'aux_loss'"
        )
    if coeff:
        raise OptionError(
            f"adamoe_aux_loss_coeff_schedule ({schedule!r}) must not be combined with "
            f"moe_aux_loss_coeff ({coeff}); keep only one of them"
        )


def _check_load_control(settings, limit) -> None:
    """The target schedule (the single target is a routing rule) and the controller's rate."""
    rate = settings.adamoe_load_controller_rate
    if rate is not None and (
        not isinstance(rate, (int, float)) or isinstance(rate, bool) or rate <= 0
    ):
        raise OptionError(
            f"adamoe_load_controller_rate ({rate!r}) must be > 0, or null for the rate-free "
            "controller; e.g. 0.01"
        )
    target, schedule = settings.adamoe_target_load, settings.adamoe_target_load_schedule
    if schedule is None:
        return
    if target is not None:
        raise OptionError(
            f"adamoe_target_load_schedule ({schedule!r}) must not be combined "
            f"with adamoe_target_load ({target!r}); keep only one of them"
        )
    if not settings.adamoe_num_null_experts:
        raise OptionError(
            f"adamoe_target_load_schedule ({schedule!r}) must be unset without null experts; "
            "with m = 0 every token uses exactly k experts"
        )
    values = StepSchedule.parse(schedule, "adamoe_target_load_schedule").values
    if any(not 0 < v < limit for v in values):
        why = (
            f"a load of {limit} leaves nothing to the null experts"
            if limit == settings.moe_router_topk
            else "a token can use at most n true experts"
        )
        raise OptionError(
            f"adamoe_target_load_schedule ({schedule!r}) must stay in (0, {limit}); {why}"
        )


def _validate_moe(args: PretrainArguments, fail) -> None:
    if args.hidden_size % args.num_attention_heads:
        fail(
            "hidden_size",
            f"be divisible by num_attention_heads ({args.num_attention_heads})",
            "change either value",
        )
    if args.min_lr > args.lr:
        fail("min_lr", f"be <= lr ({args.lr})", "lower min_lr")
    freq = args.moe_layer_freq
    if isinstance(freq, int) and freq < 1:
        fail(
            "moe_layer_freq",
            "be >= 1 (every freq-th layer is MoE) or a 0/1 list per layer",
            "fix the value",
        )
    if isinstance(freq, list) and (
        len(freq) != args.num_layers or any(v not in (0, 1) for v in freq)
    ):
        fail("moe_layer_freq", f"list 0/1 for each of the {args.num_layers} layers", "fix the list")
    if not args.is_dense:
        check_adamoe(args, "options", len(args.moe_layer_indices()))
    if args.max_position_embeddings is not None and args.max_position_embeddings < args.seq_length:
        fail("max_position_embeddings", f"be >= seq_length ({args.seq_length})", "raise it")
    groups = args.num_query_groups
    if groups is not None and args.num_attention_heads % groups:
        fail(
            "num_query_groups",
            f"divide num_attention_heads ({args.num_attention_heads})",
            "change either value",
        )
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= decay_iters:
        fail(
            "lr_warmup_iters",
            f"be < lr_decay_iters or train_iters ({decay_iters})",
            "shorten the warm-up",
        )


def _validate_topology(args: PretrainArguments, fail) -> None:
    model_parallel = (
        args.tensor_model_parallel_size
        * args.pipeline_model_parallel_size
        * args.context_parallel_size
    )
    if args.world_size % model_parallel:
        raise OptionError(
            f"world size ({args.world_size}) must be divisible by tensor x pipeline x context "
            f"parallel size ({model_parallel}); launch a multiple of {model_parallel} processes "
            "or change the layout"
        )
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    expert_grid = etp * args.expert_model_parallel_size * args.pipeline_model_parallel_size
    if args.world_size % expert_grid:
        raise OptionError(
            f"world size ({args.world_size}) must be divisible by expert tensor x expert x "
            f"pipeline parallel size ({expert_grid}); change expert_model_parallel_size or "
            "the number of processes"
        )
    if args.num_layers % args.pipeline_model_parallel_size:
        fail(
            "num_layers",
            f"be divisible by pipeline_model_parallel_size ({args.pipeline_model_parallel_size})",
            "change either value",
        )
    _validate_sharding(args, etp, fail)
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        fail(
            "sequence_parallel",
            "be false when tensor_model_parallel_size is 1",
            "drop --sequence-parallel or raise the TP size",
        )
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel and not args.is_dense:
        fail(
            "sequence_parallel",
            "be true when tensor_model_parallel_size > 1 with MoE layers "
            "(Megatron-Core requires it)",
            "add --sequence-parallel",
        )
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is not None and args.global_batch_size % per_step:
        fail(
            "global_batch_size",
            f"be a multiple of micro_batch_size x data-parallel size "
            f"({args.micro_batch_size} x {args.data_parallel_size})",
            "change the batch sizes",
        )


def _validate_dense(args: PretrainArguments, fail) -> None:
    """num_experts 0: a dense model, so nothing may ask for experts or routing."""
    for name, dense_value in (
        ("adamoe_num_null_experts", 0),
        ("expert_model_parallel_size", 1),
        ("adamoe_target_load", None),
        ("adamoe_target_load_schedule", None),
        ("adamoe_router_mode", "topk"),
        ("moe_router_enable_expert_bias", False),
        ("moe_grouped_gemm", False),
    ):
        if getattr(args, name) != dense_value:
            fail(
                name,
                f"be {dense_value!r} in a dense model (num_experts 0)",
                "drop it, or set num_experts > 0 for MoE layers",
            )


def _validate_sharding(args: PretrainArguments, etp: int, fail) -> None:
    """Sizes each parallel dimension splits, and MoE layers on every pipeline stage."""
    tp, cp, pp = (
        args.tensor_model_parallel_size,
        args.context_parallel_size,
        args.pipeline_model_parallel_size,
    )
    for name in ("num_attention_heads", "hidden_size", "ffn_hidden_size", "num_query_groups"):
        value = getattr(args, name)
        if value is not None and value % tp:
            fail(name, f"be divisible by tensor_model_parallel_size ({tp})", "change either value")
    if args.moe_ffn_hidden_size is not None and args.moe_ffn_hidden_size % etp:
        fail(
            "moe_ffn_hidden_size",
            f"be divisible by the expert tensor parallel size ({etp})",
            "change either value",
        )
    if cp > 1 and args.seq_length % (2 * cp):
        fail(
            "seq_length",
            f"be divisible by 2 x context_parallel_size ({2 * cp})",
            "change either value",
        )
    if args.sequence_parallel and args.seq_length % tp:
        fail(
            "seq_length",
            f"be divisible by tensor_model_parallel_size ({tp}) under sequence_parallel",
            "change either value",
        )
    if args.is_dense:
        return
    pattern = vocab.moe_layer_pattern(args.num_layers, args.moe_layer_freq)
    per_stage = args.num_layers // pp
    for stage in range(pp):
        if not any(pattern[stage * per_stage : (stage + 1) * per_stage]):
            fail(
                "moe_layer_freq",
                f"put an MoE layer on every pipeline stage (stage {stage} of {pp} has none)",
                "change moe_layer_freq or pipeline_model_parallel_size",
            )


def _split_shares(split: str) -> list[float]:
    try:
        shares = [float(part) for part in split.split(",")]
    except ValueError:
        shares = []
    if len(shares) != 3 or any(share < 0 for share in shares) or sum(shares) <= 0:
        raise OptionError(
            f"split ({split!r}) must be three non-negative weights "
            "'train,valid,test'; e.g. '98,2,0'"
        )
    return shares


def _validate_io(args: PretrainArguments, fail) -> None:
    shares = _split_shares(args.split)
    if shares[0] == 0:
        fail("split", "give the training set a share", "e.g. '98,2,0'")
    if args.eval_interval and shares[1] == 0:
        fail(
            "split",
            "give the validation set a share when eval_interval is set",
            "e.g. '98,2,0', or drop eval_interval",
        )
    if not args.data_path:
        fail("data_path", "be set", "run tools/preprocess_data.py and pass its output prefix")
    needed = [True, bool(args.eval_interval), False]
    for prefix in args.data_path:
        if isinstance(prefix, (int, float)):
            continue  # a blend weight
        stats = indexed.read_index(str(prefix))
        indexed.check_splits(str(prefix), stats, shares, args.split, needed, args.seq_length)
        # Megatron's GPTDataset writes its index cache here (path_to_cache or its default).
        cache = args.data_cache_path or os.path.join(str(prefix), "cache", "GPTDataset_indices")
        check_writable(
            "data_cache_path" if args.data_cache_path else "data_path",
            cache,
            "the dataset index cache goes there; set data_cache_path to a writable directory",
        )
    if args.save is not None:
        check_writable(
            "save", args.save, "checkpoints go there; fix its permissions or point save elsewhere"
        )
    if args.tokenizer_model is None or not os.path.isfile(args.tokenizer_model):
        fail(
            "tokenizer_model",
            "be an existing sentencepiece .model file",
            "pass the model tools/preprocess_data.py wrote",
        )
    _check_token_ids(args)
    if args.skip_train and not args.eval_interval:
        fail(
            "skip_train",
            "come with eval_interval (the validation set size depends on it)",
            "set eval_interval",
        )
    if args.save_interval is not None and args.save is None:
        fail("save_interval", "come with a save directory", "set save or drop save_interval")


def _check_token_ids(args: PretrainArguments) -> None:
    """Every token id of the data is one the tokenizer knows (an id past the vocabulary would
    crash the embedding minutes into the run)."""
    import sentencepiece

    try:
        vocab = sentencepiece.SentencePieceProcessor(model_file=args.tokenizer_model).vocab_size()
    except (OSError, RuntimeError):
        return  # not a sentencepiece model: the run's tokenizer loading names it
    for prefix in args.data_path:
        if isinstance(prefix, (int, float)):
            continue
        cache = args.data_cache_path or os.path.join(str(prefix), "cache", "GPTDataset_indices")
        largest = indexed.max_token_id(str(prefix), cache)
        if largest >= vocab:
            raise OptionError(
                f"data_path ({str(prefix)!r}) must hold token ids < the tokenizer's vocabulary "
                f"({vocab}, {args.tokenizer_model}); its largest is {largest}: the data was made "
                "with another tokenizer; rebuild it with tools/preprocess_data.py "
                "--tokenizer-model, or pass the tokenizer it was made with"
            )
