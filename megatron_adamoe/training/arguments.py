"""Pretraining options: Megatron's names, read from YAML, overridden from the command line.

``load_arguments(config_path, overrides, world_size)`` returns validated ``PretrainArguments``.
Every key is a Megatron argument name (``num_experts``, ``moe_router_topk``; new ones start with
``adamoe_``). Command-line overrides use Megatron's flag spelling (``--moe-router-topk 3``,
``--bf16``, ``--no-bf16``). Anything wrong raises a one-line ``ValueError`` naming the field.

This module does not import Megatron-Core or torch, so the launch script can check a config
in a fraction of a second before it starts any process.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tempfile
import typing
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import yaml

from megatron_adamoe.errors import OptionError
from megatron_adamoe.training import data_check


@dataclass
class PretrainArguments:
    # --- model (GPTModel) ---
    num_layers: int = 4
    hidden_size: int = 128
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None
    seq_length: int = 128
    max_position_embeddings: Optional[int] = None
    position_embedding_type: str = "rope"
    rotary_base: int = 10000
    normalization: str = "RMSNorm"
    norm_epsilon: float = 1e-5
    swiglu: bool = True
    untie_embeddings_and_output_weights: bool = True
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    init_method_std: float = 0.02
    make_vocab_size_divisible_by: int = 128
    # --- MoE ---
    num_experts: int = 4
    moe_ffn_hidden_size: Optional[int] = None
    moe_router_topk: int = 2
    moe_layer_freq: Union[int, list] = 1
    moe_aux_loss_coeff: Optional[float] = None  # 0.01, or 0 under adamoe_aux_loss_coeff_schedule
    moe_z_loss_coeff: Optional[float] = None
    moe_router_dtype: Optional[str] = "fp32"
    moe_token_dispatcher_type: str = "alltoall"
    moe_grouped_gemm: bool = False
    moe_permute_fusion: bool = False
    # --- FP8 (GPU, Transformer Engine) ---
    fp8_format: Optional[str] = None  # Megatron's --fp8-format: e4m3 | hybrid; null = off
    fp8_recipe: str = "delayed"  # delayed | tensorwise (current scaling) | blockwise | mxfp8
    # --- AdaMoE ---
    adamoe_num_null_experts: int = 0
    adamoe_null_expert_type: str = "zero"
    adamoe_weight_norm: str = "true_experts"
    adamoe_aux_loss_coeff_schedule: Optional[str] = None
    adamoe_flops_baseline_topk: Optional[int] = None
    # --- parallelism ---
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # --- optimisation ---
    micro_batch_size: int = 4
    global_batch_size: Optional[int] = None
    train_iters: int = 100
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_decay_style: str = "cosine"
    lr_warmup_iters: int = 0
    lr_decay_iters: Optional[int] = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    seed: int = 1234
    # --- data ---
    data_path: Optional[list] = None
    split: str = "98,2,0"
    adamoe_data_seed: Optional[int] = None  # shuffles the data; null = seed (Megatron's rule)
    tokenizer_model: Optional[str] = None
    data_cache_path: Optional[str] = None
    # --- checkpoints ---
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None
    exit_interval: Optional[int] = None  # stop (after saving) when iteration % exit_interval == 0
    finetune: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    # --- logging and evaluation ---
    log_interval: int = 10
    eval_interval: Optional[int] = None
    eval_iters: int = 10
    skip_train: bool = False  # load, evaluate once, exit (Megatron's --skip-train)
    tensorboard_dir: Optional[str] = None
    wandb_project: Optional[str] = None
    adamoe_metrics_file: Optional[str] = None  # JSON lines, one per iteration, exact floats
    # --- filled in by load_arguments, not settable ---
    world_size: int = field(default=1, metadata={"derived": True})
    data_parallel_size: int = field(default=1, metadata={"derived": True})

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.data_parallel_size)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if _settable(f)}


CHOICES = {
    "position_embedding_type": ("rope", "learned_absolute"),
    "normalization": ("RMSNorm", "LayerNorm"),
    "lr_decay_style": ("constant", "linear", "cosine", "inverse-square-root"),
    "moe_router_dtype": (None, "fp32", "fp64"),
    "moe_token_dispatcher_type": ("alltoall", "allgather", "flex"),
    "adamoe_null_expert_type": ("zero", "identity"),
    "adamoe_weight_norm": ("true_experts", "all_selected", "none"),
    "fp8_format": (None, "e4m3", "hybrid"),
    "fp8_recipe": ("delayed", "tensorwise", "blockwise", "mxfp8"),
}
POSITIVE = (
    "num_layers hidden_size num_attention_heads seq_length num_experts moe_router_topk "
    "tensor_model_parallel_size pipeline_model_parallel_size expert_model_parallel_size "
    "context_parallel_size micro_batch_size train_iters log_interval eval_iters "
    "make_vocab_size_divisible_by"
).split()
OPTIONAL_POSITIVE = (
    "ffn_hidden_size num_query_groups max_position_embeddings moe_ffn_hidden_size "
    "expert_tensor_parallel_size global_batch_size save_interval eval_interval "
    "lr_decay_iters adamoe_flops_baseline_topk exit_interval"
).split()
NON_NEGATIVE = (
    "adamoe_num_null_experts moe_aux_loss_coeff lr min_lr lr_warmup_iters weight_decay clip_grad"
).split()


def _settable(f: dataclasses.Field) -> bool:
    return not f.metadata.get("derived", False)


def settable_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(PretrainArguments) if _settable(f)}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a raw YAML/CLI value against the field's declared type."""
    hint = typing.get_type_hints(PretrainArguments)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise OptionError(f"{name} (None) must be set ({source}); give it a value or drop the key")
    allowed = [a for a in args if a is not type(None)] or [hint]
    if name == "data_path" and isinstance(value, str):
        value = value.split()
    for kind in allowed:
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is list and isinstance(value, list):
            return value
        if kind in (int, bool, str) and type(value) is kind:
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise OptionError(f"{name} ({value!r}) must be {names} ({source}); fix the value")


def _unknown_key(key: str, source: str) -> OptionError:
    guess = difflib.get_close_matches(key, list(settable_fields()), n=1, cutoff=0.5)
    hint = f"did you mean '{guess[0]}'?" if guess else "the keys are PretrainArguments fields"
    return OptionError(f"config key '{key}' ({source}) is not a known option; {hint}")


def _yaml_error(path: str, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(error, "problem", None) or "invalid YAML"
    return f"config ({path!r}) must be valid YAML: {problem}{where}; fix the file"


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``--moe-router-topk 3 --bf16 --no-swiglu --data-path a b`` -> {key: value}."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--"):
            raise OptionError(
                f"command-line argument ({token!r}) must be a --flag or its value; "
                "write overrides as --key value"
            )
        flag, _, inline = token[2:].partition("=")
        values = [inline] if inline else []
        index += 1
        while not inline and index < len(argv) and not argv[index].startswith("--"):
            values.append(argv[index])
            index += 1
        key = flag.replace("-", "_")
        if not values and key.startswith("no_") and key[3:] in settable_fields():
            overrides[key[3:]] = False
        elif not values:
            overrides[key] = True
        elif len(values) == 1:
            overrides[key] = yaml.safe_load(values[0])
        else:
            overrides[key] = [yaml.safe_load(v) for v in values]
    return overrides


def load_arguments(
    config_path: Optional[str], overrides: Optional[dict] = None, world_size: int = 1
) -> PretrainArguments:
    """YAML file, then overrides, then derived values and validation."""
    raw: dict[str, Any] = {}
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise OptionError(
                f"config ({config_path!r}) must be an existing YAML file; check the path"
            )
        with open(config_path) as handle:
            try:
                loaded = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                raise OptionError(_yaml_error(config_path, error)) from None
        if not isinstance(loaded, dict):
            raise OptionError(f"config ({config_path!r}) must be a YAML mapping of key: value")
        raw.update({k: (v, os.path.basename(config_path)) for k, v in loaded.items()})
    raw.update({k: (v, "command line") for k, v in (overrides or {}).items()})
    fields = settable_fields()
    values = {}
    for key, (value, source) in raw.items():
        if key not in fields:
            raise _unknown_key(key, source)
        values[key] = _coerce(key, value, source)
    args = PretrainArguments(**values)
    args.world_size = world_size
    validate(args)
    return args


def validate(args: PretrainArguments, check_io: bool = True,
             check_topology: bool = True) -> None:
    """Every rule. Converters skip ``check_io`` (data, tokenizer and checkpoint paths: a later
    run supplies them) and, reading a saved config, ``check_topology`` (the world size)."""

    def fail(name: str, rule: str, fix: str) -> None:
        raise OptionError(f"{name} ({getattr(args, name)!r}) must {rule}; {fix}")

    for name, choices in CHOICES.items():
        if getattr(args, name) not in choices:
            fail(name, f"be one of {', '.join(map(repr, choices))}", "pick one of them")
    for name in POSITIVE:
        if getattr(args, name) <= 0:
            fail(name, "be > 0", "set a positive value")
    for name in OPTIONAL_POSITIVE:
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            fail(name, "be > 0 when set", "set a positive value or drop the key")
    if args.moe_aux_loss_coeff is None:
        args.moe_aux_loss_coeff = 0.0 if args.adamoe_aux_loss_coeff_schedule else 0.01
    for name in NON_NEGATIVE:
        if getattr(args, name) < 0:
            fail(name, "be >= 0", "set a non-negative value")
    for name in ("seed", "adamoe_data_seed"):
        if getattr(args, name) is not None and not 0 <= getattr(args, name) < 2**32:
            fail(name, "be in [0, 2**32)", "pick a non-negative 32-bit seed")
    if args.norm_epsilon <= 0:
        fail("norm_epsilon", "be > 0", "set a small positive value such as 1e-5")
    if args.fp8_format and not args.bf16:
        fail("fp8_format", "come with bf16 (FP8 GEMMs keep bf16 weights and activations)",
             "add --bf16")
    _validate_moe(args, fail)
    if check_topology:
        _validate_topology(args, fail)
    if check_io:
        _validate_io(args, fail)


def _validate_moe(args: PretrainArguments, fail) -> None:
    n, m, k = args.num_experts, args.adamoe_num_null_experts, args.moe_router_topk
    if k > n + m:
        fail("moe_router_topk", f"be <= num_experts + adamoe_num_null_experts ({n} + {m})",
             "lower k or add null experts")
    if m == 0 and k > n:
        fail("moe_router_topk", f"be <= num_experts ({n}) without null experts", "lower k")
    if args.num_experts % args.expert_model_parallel_size:
        fail("num_experts", f"be divisible by expert_model_parallel_size "
             f"({args.expert_model_parallel_size})", "change the expert count or EP size")
    if args.hidden_size % args.num_attention_heads:
        fail("hidden_size", f"be divisible by num_attention_heads ({args.num_attention_heads})",
             "change either value")
    if args.min_lr > args.lr:
        fail("min_lr", f"be <= lr ({args.lr})", "lower min_lr")
    freq = args.moe_layer_freq
    if isinstance(freq, int) and freq < 1:
        fail("moe_layer_freq", "be >= 1 (every freq-th layer is MoE) or a 0/1 list per layer",
             "fix the value")
    if isinstance(freq, list) and (len(freq) != args.num_layers
                                   or any(v not in (0, 1) for v in freq)):
        fail("moe_layer_freq", f"list 0/1 for each of the {args.num_layers} layers",
             "fix the list")
    if args.max_position_embeddings is not None and args.max_position_embeddings < args.seq_length:
        fail("max_position_embeddings", f"be >= seq_length ({args.seq_length})", "raise it")
    groups = args.num_query_groups
    if groups is not None and args.num_attention_heads % groups:
        fail("num_query_groups", f"divide num_attention_heads ({args.num_attention_heads})",
             "change either value")
    decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters >= decay_iters:
        fail("lr_warmup_iters", f"be < lr_decay_iters or train_iters ({decay_iters})",
             "shorten the warm-up")


def _validate_topology(args: PretrainArguments, fail) -> None:
    model_parallel = (
        args.tensor_model_parallel_size * args.pipeline_model_parallel_size
        * args.context_parallel_size
    )
    if args.world_size % model_parallel:
        raise OptionError(
            f"world size ({args.world_size}) must be divisible by tensor x pipeline x context "
            f"parallel size ({model_parallel}); launch a multiple of {model_parallel} processes "
            "or change the layout"
        )
    args.data_parallel_size = args.world_size // model_parallel
    etp = args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    expert_grid = etp * args.expert_model_parallel_size * args.pipeline_model_parallel_size
    if args.world_size % expert_grid:
        raise OptionError(
            f"world size ({args.world_size}) must be divisible by expert tensor x expert x "
            f"pipeline parallel size ({expert_grid}); change expert_model_parallel_size or "
            "the number of processes"
        )
    if args.num_layers % args.pipeline_model_parallel_size:
        fail("num_layers", f"be divisible by pipeline_model_parallel_size "
             f"({args.pipeline_model_parallel_size})", "change either value")
    _validate_sharding(args, etp, fail)
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        fail("sequence_parallel", "be false when tensor_model_parallel_size is 1",
             "drop --sequence-parallel or raise the TP size")
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        fail("sequence_parallel", "be true when tensor_model_parallel_size > 1 with MoE layers "
             "(Megatron-Core requires it)", "add --sequence-parallel")
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = per_step
    if args.global_batch_size % per_step:
        fail("global_batch_size", f"be a multiple of micro_batch_size x data-parallel size "
             f"({args.micro_batch_size} x {args.data_parallel_size})", "change the batch sizes")


def _validate_sharding(args: PretrainArguments, etp: int, fail) -> None:
    """Sizes each parallel dimension splits, and MoE layers on every pipeline stage."""
    tp, cp, pp = (args.tensor_model_parallel_size, args.context_parallel_size,
                  args.pipeline_model_parallel_size)
    for name in ("num_attention_heads", "hidden_size", "ffn_hidden_size", "num_query_groups"):
        value = getattr(args, name)
        if value is not None and value % tp:
            fail(name, f"be divisible by tensor_model_parallel_size ({tp})", "change either value")
    if args.moe_ffn_hidden_size is not None and args.moe_ffn_hidden_size % etp:
        fail("moe_ffn_hidden_size", f"be divisible by the expert tensor parallel size ({etp})",
             "change either value")
    if cp > 1 and args.seq_length % (2 * cp):
        fail("seq_length", f"be divisible by 2 x context_parallel_size ({2 * cp})",
             "change either value")
    if args.sequence_parallel and args.seq_length % tp:
        fail("seq_length", f"be divisible by tensor_model_parallel_size ({tp}) under "
             "sequence_parallel", "change either value")
    freq = args.moe_layer_freq
    pattern = freq if isinstance(freq, list) else [
        int(i % freq == 0) for i in range(args.num_layers)]
    per_stage = args.num_layers // pp
    for stage in range(pp):
        if not any(pattern[stage * per_stage:(stage + 1) * per_stage]):
            fail("moe_layer_freq", f"put an MoE layer on every pipeline stage (stage {stage} of "
                 f"{pp} has none)", "change moe_layer_freq or pipeline_model_parallel_size")


def _split_shares(split: str) -> list[float]:
    try:
        shares = [float(part) for part in split.split(",")]
    except ValueError:
        shares = []
    if len(shares) != 3 or any(share < 0 for share in shares) or sum(shares) <= 0:
        raise OptionError(f"split ({split!r}) must be three non-negative weights "
                         "'train,valid,test'; e.g. '98,2,0'")
    return shares


def _validate_io(args: PretrainArguments, fail) -> None:
    shares = _split_shares(args.split)
    if shares[0] == 0:
        fail("split", "give the training set a share", "e.g. '98,2,0'")
    if args.eval_interval and shares[1] == 0:
        fail("split", "give the validation set a share when eval_interval is set",
             "e.g. '98,2,0', or drop eval_interval")
    if not args.data_path:
        fail("data_path", "be set", "run tools/preprocess_data.py and pass its output prefix")
    needed = [True, bool(args.eval_interval), False]
    for prefix in args.data_path:
        if isinstance(prefix, (int, float)):
            continue  # a blend weight
        stats = data_check.read_index(str(prefix))
        data_check.check_splits(str(prefix), stats, shares, args.split, needed, args.seq_length)
        # Megatron's GPTDataset writes its index cache here (path_to_cache or its default).
        cache = args.data_cache_path or os.path.join(str(prefix), "cache", "GPTDataset_indices")
        _check_writable("data_cache_path" if args.data_cache_path else "data_path", cache,
                        "the dataset index cache goes there; set data_cache_path to a writable "
                        "directory")
    if args.save is not None:
        _check_writable("save", args.save, "checkpoints go there; fix its permissions or point "
                        "save elsewhere")
    if args.tokenizer_model is None or not os.path.isfile(args.tokenizer_model):
        fail("tokenizer_model", "be an existing sentencepiece .model file",
             "pass the model tools/preprocess_data.py wrote")
    if args.skip_train and not args.eval_interval:
        fail("skip_train", "come with eval_interval (the validation set size depends on it)",
             "set eval_interval")
    if args.save_interval is not None and args.save is None:
        fail("save_interval", "come with a save directory", "set save or drop save_interval")


def _check_writable(name: str, directory: str, why: str) -> None:
    """``directory`` exists or can be made, and a file can be written in it (then removed)."""
    try:
        os.makedirs(directory, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".adamoe-write-check-", dir=directory)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise OptionError(f"{name} ({directory!r}) must be a writable directory "
                          f"({error.strerror}); {why}") from None


def padded_vocab_size(vocab_size: int, args: PretrainArguments) -> int:
    """Megatron's rule: round the vocabulary up to a multiple of divisor x TP size."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return ((vocab_size + multiple - 1) // multiple) * multiple


def resolved_yaml(args: PretrainArguments) -> str:
    """The fully resolved options (every key), as written next to each checkpoint."""
    return yaml.safe_dump(args.to_dict(), sort_keys=False)
