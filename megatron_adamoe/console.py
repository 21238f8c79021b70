"""Console output of the entry points: Megatron's and torch's known, harmless warnings kept out
of the user's way; anything else still shows. (One-line errors are megatron_adamoe.errors.)
``quiet_known_upstream_noise`` runs before Megatron is imported: some of its warnings are raised
at import time."""

from __future__ import annotations

import logging
import warnings

_KNOWN_WARNINGS = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
    r"`torch.distributed.reduce_scatter_tensor` is deprecated",
    # megatron-core 0.19 warns at import of its multimodal (MIMO) configs, which we never use.
    r"MimoModelConfig is experimental",
    # PEFT's prepare_model_for_kbit_training (QLoRA) reads transformers 5's deprecated name.
    r"`is_gradient_checkpointing` is deprecated",
)

# (logger, message prefix) of Megatron's log lines that say nothing about this run.
_KNOWN_LOG_LINES = (
    # On CPU the "GPU" RNG of Megatron's tracker is torch's CPU generator (CPU mode), so every
    # fork of the tracker (dropout in tensor-parallel regions) changes the CPU RNG state.
    ("megatron.core.tensor_parallel.random", "CPU RNG state changed within GPU RNG context"),
    # The rerun state machine (result validation by re-running steps) is off in our loop.
    ("megatron.core.rerun_state_machine", "Implicit initialization of Rerun State Machine"),
    ("megatron.core.rerun_state_machine", "RerunStateMachine initialized in mode"),
    # TransformerLayer warns that it passes no process groups to an MLP that is not exactly
    # MoELayer; AdaMoELayer then takes them from parallel_state, as documented in the README.
    ("megatron.core.transformer.transformer_layer", "Unknown MLP type"),
    # bitsandbytes (imported by PEFT) tries an optional CPU kernel from the Hugging Face hub at
    # import; without it (offline here) it uses its own CPU 4-bit kernels.
    (
        "bitsandbytes.backends.cpu.ops",
        "Failed to load CPU gemm_4bit_forward from kernels-community",
    ),
)


class _DropKnownLines(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def quiet_known_upstream_noise() -> None:
    """Drop upstream warnings and log lines that say nothing about this run (missing Apex/TE on
    CPU, torch deprecations inside Megatron, CPU-mode RNG notices) and Megatron's INFO chatter.
    Idempotent."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for message in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    by_logger: dict[str, tuple[str, ...]] = {}
    for name, prefix in _KNOWN_LOG_LINES:
        by_logger[name] = by_logger.get(name, ()) + (prefix,)
    for name, prefixes in by_logger.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropKnownLines) for f in logger.filters):
            logger.addFilter(_DropKnownLines(prefixes))


class _DropAgreeingAccumulation(logging.Filter):
    """accelerate's "Gradient accumulation steps mismatch: GradientAccumulationPlugin has 1,
    DeepSpeed config has N. Using DeepSpeed's value." comes whenever the HF Trainer runs DeepSpeed
    with N > 1 (the Trainer hands accelerate 1 and accumulates itself): dropped when N is the
    run's own --gradient-accumulation-steps, shown otherwise."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.line = f"GradientAccumulationPlugin has 1, DeepSpeed config has {steps}."

    def filter(self, record: logging.LogRecord) -> bool:
        return self.line not in record.getMessage()


def quiet_fine_tuning_noise(gradient_accumulation_steps: int) -> None:
    """``quiet_known_upstream_noise`` and, for adamoe-finetune, accelerate's notice of a
    gradient-accumulation "mismatch" that agrees with the run. Idempotent."""
    quiet_known_upstream_noise()
    logger = logging.getLogger("accelerate.accelerator")
    for old in [f for f in logger.filters if isinstance(f, _DropAgreeingAccumulation)]:
        logger.removeFilter(old)
    logger.addFilter(_DropAgreeingAccumulation(gradient_accumulation_steps))
