"""Fine-tune an AdaMoE model in Hugging Face form with the HF Trainer, optionally under DeepSpeed
ZeRO (``python -m megatron_adamoe.hf.finetune`` / ``adamoe-finetune``): the paper's workflow.

    adamoe-finetune --model hf/adamoe_mixtral --data train.jsonl --output-dir out/ \\
        --deepspeed configs/deepspeed/zero3.json --max-steps 1000 --learning-rate 1e-5
    torchrun --nproc-per-node 8 -m megatron_adamoe.hf.finetune ...   # or: deepspeed --module ...

Data: ``.jsonl`` (``--json-key``, default "text") or text files, tokenized with the model's own
tokenizer, each document ended with EOS, concatenated and cut into ``--seq-length`` blocks,
shuffled once with ``--seed`` and then read in that order (the same blocks in the same steps
whatever the data-parallel layout). The loss is the LM loss plus ``--aux-loss-coef`` x the
null-aware load-balancing loss summed over MoE layers (``output_router_logits``); a model with a
null bias keeps its load at ``router_target_load`` with the controller
(``--load-controller-rate``). Logs: loss, aux loss (per MoE layer) and the measured load per
layer (averaged over ranks), to stdout and ``--metrics-file``.

``--method mo-lora`` adds AdaMoE LoRA experts to a frozen dense model instead (paper section
4.1; docs/finetuning.md) and writes only the adapters.

Checkpoints (the Trainer's own, with optimizer, scheduler and RNG state) go to
``--checkpoint-dir`` (default ``<output-dir>-checkpoints``) every ``--save-steps`` and when the
run is stopped by SIGTERM (from the launcher or SLURM; or when the launcher is gone); ``--resume``
continues from the latest one. The fine-tuned model is written next to ``--output-dir`` and
renamed to it when complete: the directory holds a whole model that ``from_pretrained`` loads,
or does not exist. Bad inputs are one line each, before anything is written. CPU runs use gloo;
GPU runs NCCL (and ``--bf16``). DeepSpeed's CPU communication extension is built once by local
rank 0 before any rank initialises DeepSpeed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from typing import Optional

import torch

from megatron_adamoe.adapters.mo_lora import DEFAULT_TARGETS
from megatron_adamoe.console import quiet_fine_tuning_noise
from megatron_adamoe.errors import OptionError, report
from megatron_adamoe.hf.finetune_checks import check, checkpoint_dir
from megatron_adamoe.hf.finetune_data import BlockDataset

logger = logging.getLogger("megatron_adamoe.finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamoe-finetune",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add = parser.add_argument
    add(
        "--model",
        required=True,
        help="an AdaMoE HF directory (export-hf, mixtral-to-adamoe); a dense one for mo-lora",
    )
    add(
        "--method",
        choices=("full", "mo-lora"),
        default="full",
        help="full: every weight of an AdaMoE model; mo-lora: AdaMoE LoRA experts on a frozen "
        "dense model (paper section 4.1; only the adapters are written)",
    )
    add("--data", required=True, nargs="+", help=".jsonl or text files")
    add("--json-key", default="text")
    add("--output-dir", required=True, help="where the fine-tuned HF model is written (new)")
    add(
        "--checkpoint-dir",
        default=None,
        help="training checkpoints (default: <output-dir>-checkpoints)",
    )
    add("--save-steps", type=int, default=None, help="a checkpoint every N steps")
    add("--resume", action="store_true", help="continue from the latest checkpoint")
    add("--deepspeed", default=None, help="a DeepSpeed config (configs/deepspeed/zero{2,3}.json)")
    add("--seq-length", type=int, default=512)
    add("--per-device-batch-size", type=int, default=1)
    add("--gradient-accumulation-steps", type=int, default=1)
    add("--max-steps", type=int, default=100)
    add("--learning-rate", type=float, default=1e-5)
    add("--warmup-steps", type=int, default=0)
    add("--weight-decay", type=float, default=0.0)
    add(
        "--aux-loss-coef",
        type=float,
        default=None,
        help="load-balancing coefficient per MoE layer (default: the model's; mo-lora: 0.001)",
    )
    add(
        "--aux-loss-coef-schedule",
        default=None,
        help="the coefficient over optimizer steps, in the pretraining options' grammar, e.g. "
        "'piecewise:0.01,STEPS_PER_EPOCH:0.001' (tight in epoch 1, loose in epoch 2: paper "
        "section 3.4; the run logs its steps per epoch)",
    )
    add(
        "--load-controller-rate",
        type=float,
        default=0.01,
        help="null-bias step per unit of load error (models with a null bias)",
    )
    add(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute each decoder layer in the backward pass (less memory, more compute)",
    )
    add("--mo-lora-experts", type=int, default=4, help="mo-lora: n LoRA experts per linear")
    add("--mo-lora-null-experts", type=int, default=4, help="mo-lora: m null experts")
    add("--mo-lora-topk", type=int, default=2, help="mo-lora: k picks over n + m")
    add("--mo-lora-weight-norm", default="true_experts", help="mo-lora: weight normalisation")
    add("--lora-rank", type=int, default=8)
    add("--lora-alpha", type=float, default=16.0)
    add("--lora-dropout", type=float, default=0.05)
    add(
        "--lora-target-modules",
        nargs="+",
        default=list(DEFAULT_TARGETS),
        help="mo-lora: the linears to wrap, by name",
    )
    add("--logging-steps", type=int, default=10)
    add("--seed", type=int, default=1234)
    add("--bf16", action="store_true", help="bf16 (GPU)")
    add("--metrics-file", default=None, help="JSON lines, one per logging step (rank 0)")
    # The deepspeed launcher passes --local_rank=N (it also sets LOCAL_RANK, which is read).
    add("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def finetune(options) -> Optional[str]:
    """Train; write the model and return its directory, or None when stopped by a signal (a
    checkpoint was saved: resume with --resume)."""
    import megatron_adamoe.hf  # noqa: F401  (registers the AdaMoE Auto classes)
    from megatron_adamoe.hf.finetune_launch import set_single_process_world

    if options.deepspeed is not None:
        set_single_process_world()  # DeepSpeed would look for MPI without a launcher
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        check(options, world_size)
        return _finetune_checked(options)
    finally:  # no checkpoint was asked for or made: leave no empty place behind
        with contextlib.suppress(OSError):
            os.rmdir(checkpoint_dir(options))


def _finetune_checked(options) -> Optional[str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_adamoe.data.corpus import iter_documents
    from megatron_adamoe.hf.finetune_launch import watch_launchers
    from megatron_adamoe.hf.finetune_trainer import make_stop_callback

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if options.deepspeed is not None:
        from megatron_adamoe.deepspeed.extension import wait_until_built

        wait_until_built(local_rank)
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    dataset = BlockDataset(
        iter_documents(options.data, options.json_key), tokenizer, options.seq_length, options.seed
    )
    model = AutoModelForCausalLM.from_pretrained(
        options.model, **{_dtype_kwarg(): torch.bfloat16 if options.bf16 else torch.float32}
    )
    _check_vocabulary(dataset, model, options.model)
    if options.method == "mo-lora":
        from megatron_adamoe.adapters import apply_mo_lora
        from megatron_adamoe.hf.finetune_checks import mo_lora_config

        torch.manual_seed(options.seed)  # the same adapters on every rank and in every run
        apply_mo_lora(model, mo_lora_config(options))
    elif options.aux_loss_coef is not None:
        model.config.router_aux_loss_coef = options.aux_loss_coef
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = options.per_device_batch_size * options.gradient_accumulation_steps * world
    logger.info(
        "%d blocks of %d tokens: %d optimizer steps per epoch (global batch %d)",
        len(dataset),
        options.seq_length,
        len(dataset) // batch,
        batch,
    )
    watch_launchers()
    stop = make_stop_callback()()
    try:
        trainer = _trainer(options, model, dataset, stop)
        trainer.train(resume_from_checkpoint=_last_checkpoint(options) if options.resume else None)
    finally:
        stop.restore()
    if stop.stopped_at is not None:
        logger.info(
            "stopped by SIGTERM after step %d; checkpoint in %s: continue with --resume",
            stop.stopped_at,
            checkpoint_dir(options),
        )
        return None
    if options.method == "mo-lora":
        _save_adapters(trainer, model, options.output_dir)
    else:
        _save_model(trainer, model, tokenizer, options.output_dir)
    return options.output_dir


def _trainer(options, model, dataset, stop):
    from transformers import TrainingArguments

    from megatron_adamoe.hf.finetune_checks import aux_loss_schedule
    from megatron_adamoe.hf.finetune_trainer import (
        make_aux_schedule_callback,
        make_controller_callback,
        make_trainer_class,
    )

    if options.deepspeed is not None and _zero_stage(options.deepspeed) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        from megatron_adamoe.hf.modeling_adamoe import AdaMoESparseMoeBlock

        if options.method == "full":  # gather each MoE block whole: experts on varying rows
            set_z3_leaf_modules(model, [AdaMoESparseMoeBlock])
    try:
        arguments = TrainingArguments(
            output_dir=checkpoint_dir(options),
            per_device_train_batch_size=options.per_device_batch_size,
            gradient_accumulation_steps=options.gradient_accumulation_steps,
            max_steps=options.max_steps,
            learning_rate=options.learning_rate,
            warmup_steps=options.warmup_steps,
            weight_decay=options.weight_decay,
            logging_steps=options.logging_steps,
            save_strategy="steps" if options.save_steps else "no",
            save_steps=options.save_steps or 500,
            seed=options.seed,
            bf16=options.bf16,
            **_checkpointing_argument(options.gradient_checkpointing),
            deepspeed=options.deepspeed,
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            dataloader_drop_last=True,
            ddp_backend=(
                "gloo"
                if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
                else None
            ),
            ddp_find_unused_parameters=False,
            disable_tqdm=True,
        )
        callbacks = [stop]
        if options.aux_loss_coef_schedule is not None:
            callbacks.append(
                make_aux_schedule_callback()(model, aux_loss_schedule(options), options.method)
            )
        if options.method == "full":
            callbacks.insert(0, make_controller_callback()(model, options.load_controller_rate))
        return make_trainer_class(options.method)(
            model=model,
            args=arguments,
            train_dataset=dataset,
            metrics_file=options.metrics_file,
            callbacks=callbacks,
        )
    except ValueError as error:  # transformers' own check of the DeepSpeed config, as one line
        if "DeepSpeed" not in str(error) and "deepspeed" not in str(error):
            raise
        raise OptionError(
            f"deepspeed ({options.deepspeed!r}) must agree with the flags: "
            + " ".join(str(error).split())
        ) from None


def _save_model(trainer, model, tokenizer, out: str) -> None:
    """Every rank takes part (ZeRO-3 gathers the weights); rank 0 writes next to ``out`` and
    renames when complete."""
    from megatron_adamoe.hf.tokenization_adamoe import AdaMoETokenizer
    from megatron_adamoe.storage import atomic_directory

    is_writer = trainer.is_world_process_zero()
    with atomic_directory(out, "saving the fine-tuned model", shared=True, owner=is_writer) as tmp:
        # The model files go with the weights (auto_map), so it loads as exports do.
        type(model.config).register_for_auto_class()
        type(model).register_for_auto_class("AutoModelForCausalLM")
        if isinstance(tokenizer, AdaMoETokenizer):  # the project's own: its code goes along
            type(tokenizer).register_for_auto_class("AutoTokenizer")
        trainer.save_model(tmp)
        if is_writer:
            tokenizer.save_pretrained(tmp)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def _save_adapters(trainer, model, out: str) -> None:
    """Mo-LoRA: the adapters only (routers and LoRA experts), beside the unchanged base. Every
    rank takes part in gathering the state (ZeRO-3 partitions it); rank 0 writes."""
    from megatron_adamoe.adapters.mo_lora_state import save_mo_lora

    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if trainer.is_world_process_zero():
        save_mo_lora(model, out, state_dict=state)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def _check_vocabulary(dataset, model, model_dir: str) -> None:
    largest = int(dataset.blocks.max()) if len(dataset) else -1
    if largest >= model.config.vocab_size:
        raise OptionError(
            f"data token ids must be < the model's vocab_size ({model.config.vocab_size}); the "
            f"tokenizer of {model_dir} gave {largest}: the tokenizer and the model disagree"
        )


def _last_checkpoint(options) -> str:
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(checkpoint_dir(options))
    if found is None:
        raise OptionError(
            f"resume needs a checkpoint-N directory in checkpoint_dir "
            f"({checkpoint_dir(options)!r}); drop --resume to start afresh"
        )
    return found


def _checkpointing_argument(enabled: bool) -> dict:
    """TrainingArguments' name for recomputing layers: activation_checkpointing since
    transformers 5.x, gradient_checkpointing before (now a deprecated alias)."""
    import dataclasses

    from transformers import TrainingArguments

    names = {field.name for field in dataclasses.fields(TrainingArguments)}
    return {
        "activation_checkpointing"
        if "activation_checkpointing" in names
        else "gradient_checkpointing": enabled
    }


def _zero_stage(path: str) -> int:
    import json

    with open(path) as handle:
        return int((json.load(handle).get("zero_optimization") or {}).get("stage", 0))


def _dtype_kwarg() -> str:
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def main(argv: Optional[list] = None) -> int:
    options = build_parser().parse_args(argv)
    quiet_fine_tuning_noise(options.gradient_accumulation_steps)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        out = finetune(options)
    except OptionError as error:
        return report(error, rank, world)
    if out is not None:
        what = "Mo-LoRA adapters" if options.method == "mo-lora" else "fine-tuned model"
        logger.info("%s written to %s", what, out)
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
