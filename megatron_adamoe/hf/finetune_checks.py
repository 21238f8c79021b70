"""adamoe-finetune's checks before any work starts: every bad flag, model, DeepSpeed config and
place is one line naming the input and the fix (``OptionError``), raised by whichever rank
meets it, before the output or checkpoint directory is touched."""

from __future__ import annotations

import json
import os

from megatron_adamoe.errors import OptionError
from megatron_adamoe.storage import check_writable

ADAMOE_ARCHITECTURE = "AdaMoEForCausalLM"
# DeepSpeed's batch keys and the flags that set them (under "auto" the HF Trainer fills them).
_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def check(options, world_size: int = 1) -> None:
    """Everything that can be known before training: flags, the model directory, the DeepSpeed
    config, the sequence length against the model's positions, the output and checkpoint places.
    Reads no data (``data`` reports its own file and line)."""
    _check_numbers(options)
    method = getattr(options, "method", "full")
    if method == "mo-lora":
        config = read_dense_model_config(options.model)
        mo_lora_config(options)  # its own one-line checks
    elif method == "ada-k":
        config = read_moe_model_config(options.model)
        from megatron_adamoe.adak.finetune import adak_options

        adak_options(options)  # its own one-line checks
    else:
        config = read_model_config(options.model)
    if method in ("lora", "qlora"):
        lora_config(options)  # its own one-line checks (the targets: once the model is loaded)
    if method == "qlora" and options.deepspeed is not None:
        raise OptionError(
            f"deepspeed ({options.deepspeed!r}) cannot partition a 4-bit base (method qlora); "
            "run qlora in one process or under torchrun (DDP), or use --method lora with DeepSpeed"
        )
    positions = config.get("max_position_embeddings")
    if positions is not None and options.seq_length > positions:
        raise OptionError(
            f"seq_length ({options.seq_length}) must be <= the model's max_position_embeddings "
            f"({positions}); lower --seq-length"
        )
    if options.deepspeed is not None:
        check_deepspeed_config(options, world_size)
    if os.path.exists(options.output_dir):
        raise OptionError(
            f"output_dir ({options.output_dir!r}) must not exist yet: the fine-tuned model is "
            "written next to it and renamed when complete; pick a new path"
        )
    check_writable(
        "output_dir",
        os.path.dirname(os.path.abspath(options.output_dir)),
        "the fine-tuned model is written there; pick a writable place",
    )
    check_writable(
        "checkpoint_dir",
        checkpoint_dir(options),
        "training checkpoints go there; pick a writable place with --checkpoint-dir",
    )
    if options.resume and not os.listdir(checkpoint_dir(options)):
        raise OptionError(
            f"resume needs a checkpoint in checkpoint_dir ({checkpoint_dir(options)!r}), which is "
            "empty; drop --resume to start, or point --checkpoint-dir at the run's checkpoints"
        )


def checkpoint_dir(options) -> str:
    """Where the Trainer's checkpoints go: ``--checkpoint-dir``, else ``<output-dir>-checkpoints``
    (the output directory itself only ever holds a complete model)."""
    return options.checkpoint_dir or f"{options.output_dir.rstrip(os.sep)}-checkpoints"


def _check_numbers(options) -> None:
    for name in (
        "seq_length",
        "per_device_batch_size",
        "gradient_accumulation_steps",
        "max_steps",
        "logging_steps",
    ):
        if getattr(options, name) < 1:
            raise OptionError(
                f"{name} ({getattr(options, name)}) must be >= 1; pass a positive "
                f"--{name.replace('_', '-')}"
            )
    for name in ("learning_rate", "load_controller_rate"):
        if getattr(options, name) is not None and getattr(options, name) <= 0:
            raise OptionError(
                f"{name} ({getattr(options, name)}) must be > 0; pass a positive "
                f"--{name.replace('_', '-')}"
            )
    if options.aux_loss_coef is not None and options.aux_loss_coef < 0:
        raise OptionError(
            f"aux_loss_coef ({options.aux_loss_coef}) must be >= 0; use 0 to turn "
            "the load-balancing loss off"
        )
    if options.aux_loss_coef_schedule is not None:
        if options.aux_loss_coef is not None:
            raise OptionError(
                f"aux_loss_coef_schedule ({options.aux_loss_coef_schedule!r}) must not be "
                f"combined with aux_loss_coef ({options.aux_loss_coef}); keep only one of them"
            )
        aux_loss_schedule(options)
    _check_epochs(options)
    if options.save_steps is not None and options.save_steps < 1:
        raise OptionError(
            f"save_steps ({options.save_steps}) must be >= 1; pass a positive --save-steps, or "
            "drop it (a checkpoint is still written when the run is stopped by SIGTERM)"
        )


def _check_epochs(options) -> None:
    epochs = getattr(options, "num_epochs", None)
    coefficients = getattr(options, "aux_loss_coef_per_epoch", None)
    if epochs is not None and epochs < 1:
        raise OptionError(f"num_epochs ({epochs}) must be >= 1; pass a positive --num-epochs")
    if coefficients is None:
        return
    if epochs is None or len(coefficients) != epochs:
        raise OptionError(
            f"aux_loss_coef_per_epoch ({' '.join(map(str, coefficients))}) needs --num-epochs "
            f"{len(coefficients)} (one coefficient per epoch); got num_epochs ({epochs})"
        )
    if any(value < 0 for value in coefficients):
        raise OptionError(
            f"aux_loss_coef_per_epoch ({' '.join(map(str, coefficients))}) values must be >= 0"
        )
    for other in ("aux_loss_coef", "aux_loss_coef_schedule"):
        if getattr(options, other) is not None:
            raise OptionError(
                f"aux_loss_coef_per_epoch must not be combined with {other} "
                f"({getattr(options, other)}); keep only one of them"
            )


def aux_loss_schedule(options):
    """The StepSchedule of --aux-loss-coef-schedule (the options' grammar and checks: values
    >= 0)."""
    from megatron_adamoe.options.schedule import StepSchedule

    return StepSchedule.parse(options.aux_loss_coef_schedule, "aux_loss_coef_schedule")


def _load_json(path: str, subject: str) -> dict:
    """The JSON file at ``path``; a syntax error is one line naming ``subject``, line and column."""
    try:
        with open(path) as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise OptionError(
            f"{subject} must be valid JSON: {error.msg} at line {error.lineno}, column "
            f"{error.colno}; fix the file"
        ) from None


def _model_config_json(model: str, hint: str) -> dict:
    """``model``/config.json, which must exist (``hint`` ends the one-line error)."""
    path = os.path.join(model, "config.json")
    if not os.path.isfile(path):
        raise OptionError(f"model ({model!r}) must be an HF model directory with config.json{hint}")
    return _load_json(path, path)


def read_model_config(model: str) -> dict:
    """The model directory's config.json, which must describe an AdaMoE model."""
    config = _model_config_json(model, "; run adamoe-convert export-hf or mixtral-to-adamoe")
    architectures = config.get("architectures") or [config.get("model_type")]
    if ADAMOE_ARCHITECTURE not in architectures and config.get("model_type") != "adamoe":
        raise OptionError(
            f"model ({model!r}) must be an AdaMoE model (its config.json says "
            f"{architectures[0]}); convert it first: adamoe-convert mixtral-to-adamoe --hf "
            f"{model} --out {model.rstrip(os.sep)}-adamoe --num-null-experts 8 --topk 3"
        )
    return config


def read_moe_model_config(model: str) -> dict:
    """The model directory's config.json, which must describe a MoE model Ada-K can route."""
    config = _model_config_json(model, " (an AdaMoE or Mixtral model)")
    architectures = config.get("architectures") or [config.get("model_type")]
    known = {ADAMOE_ARCHITECTURE, "MixtralForCausalLM"} & set(architectures)
    if not known and config.get("model_type") not in ("adamoe", "mixtral"):
        raise OptionError(
            f"model ({model!r}) must be an AdaMoE or Mixtral model for --method ada-k (its "
            f"config.json says {architectures[0]}); pass a MoE model"
        )
    return config


def read_dense_model_config(model: str) -> dict:
    """The model directory's config.json, which must describe a dense causal LM (Mo-LoRA adds
    the experts)."""
    config = _model_config_json(model, " (a dense causal LM: Llama, Mistral, Qwen2, ...)")
    architectures = config.get("architectures") or [config.get("model_type")]
    if ADAMOE_ARCHITECTURE in architectures or config.get("num_local_experts"):
        raise OptionError(
            f"model ({model!r}) must be a dense model for --method mo-lora (its config.json "
            f"says {architectures[0]}, a MoE model); fine-tune MoE models with --method full"
        )
    return config


def mo_lora_config(options):
    """The MoLoRAConfig of the flags (its checks name the settings)."""
    from megatron_adamoe.adapters import MoLoRAConfig

    return MoLoRAConfig(
        num_experts=options.mo_lora_experts,
        num_null_experts=options.mo_lora_null_experts,
        topk=options.mo_lora_topk,
        rank=options.lora_rank,
        alpha=options.lora_alpha,
        dropout=options.lora_dropout,
        weight_norm=options.mo_lora_weight_norm,
        aux_loss_coef=0.001 if options.aux_loss_coef is None else options.aux_loss_coef,
        target_modules=tuple(options.lora_target_modules),
    )


def lora_config(options):
    """PEFT's LoraConfig of the flags (lora, qlora; its checks name the settings); one line when
    PEFT is missing."""
    try:
        import peft  # noqa: F401
    except ImportError as error:
        raise OptionError(
            f"method {options.method} needs PEFT ({error}); install the finetune extra "
            "(pip install 'megatron-adamoe[finetune]')"
        ) from None
    from megatron_adamoe.adapters.peft_lora import lora_settings

    return lora_settings(
        options.lora_rank, options.lora_alpha, options.lora_dropout, options.lora_target_modules
    )


def check_deepspeed_config(options, world_size: int) -> None:
    """The DeepSpeed config exists, parses, and its batch sizes agree with the flags."""
    path = options.deepspeed
    if not os.path.isfile(path):
        raise OptionError(
            f"deepspeed ({path!r}) must be an existing DeepSpeed config; see configs/deepspeed/"
        )
    config = _load_json(path, f"deepspeed ({path!r})")
    flags = {
        "train_micro_batch_size_per_gpu": (
            options.per_device_batch_size,
            "--per-device-batch-size",
        ),
        "gradient_accumulation_steps": (
            options.gradient_accumulation_steps,
            "--gradient-accumulation-steps",
        ),
        "train_batch_size": (
            options.per_device_batch_size * options.gradient_accumulation_steps * world_size,
            "--per-device-batch-size x --gradient-accumulation-steps x processes",
        ),
    }
    for key in _BATCH_KEYS:
        value = config.get(key, "auto")
        wanted, flag = flags[key]
        if value != "auto" and value != wanted:
            raise OptionError(
                f"deepspeed ({path!r}) {key} ({value!r}) must equal {flag} ({wanted}) or be "
                f'"auto"; set it to "auto" (the flags then decide) or change the flags'
            )
