"""Fine-tune an AdaMoE model in Hugging Face form with the HF Trainer, optionally under DeepSpeed
ZeRO (``python -m megatron_adamoe.hf.finetune`` / ``adamoe-finetune``): the paper's workflow.

    adamoe-finetune --model hf/adamoe_mixtral --data train.jsonl --output-dir out/ \\
        --deepspeed configs/deepspeed/zero3.json --max-steps 1000 --learning-rate 1e-5
    torchrun --nproc-per-node 8 -m megatron_adamoe.hf.finetune ...   # or: deepspeed --module ...

Data: ``.jsonl`` (``--json-key``, default "text") or text files, tokenized with the model's own
tokenizer, each document ended with EOS, concatenated and cut into ``--seq-length`` blocks,
shuffled once with ``--seed`` and then read in that order (the same blocks in the same steps
whatever the data-parallel layout). Supervised JSONL (prompt/completion or
question/choices/answer records; ``--data-format``) gives one example per row with the loss on
the completion only, averaged per example (docs/finetuning.md). The loss is the LM loss plus
``--aux-loss-coef`` x the null-aware load-balancing loss summed over MoE layers
(``output_router_logits``); a model with a null bias keeps its load at ``router_target_load``
with the controller (``--load-controller-rate``). Logs: loss, aux loss (per MoE layer) and the
measured load per layer (averaged over ranks), to stdout and ``--metrics-file``.

``--method lora|qlora`` trains PEFT LoRA adapters on the router (all n + m rows) and the experts
of an AdaMoE model (qlora: its base in 4 bits; paper section 4.2) and writes only the adapters
(``adamoe-convert merge-lora`` merges them); ``--method mo-lora`` adds AdaMoE LoRA experts to a
frozen dense model (paper section 4.1); ``--method ada-k`` trains Ada-K's allocators by PPO on
a frozen MoE model (megatron_adamoe.adak.finetune). ``--config`` reads a recipe
(configs/finetune/; flags override it); ``--num-epochs`` with ``--aux-loss-coef-per-epoch`` runs
the paper's epochs with a tight, then a loose coefficient. docs/finetuning.md has both recipes.

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

from megatron_adamoe.console import quiet_fine_tuning_noise
from megatron_adamoe.errors import OptionError, report
from megatron_adamoe.hf import finetune_flags
from megatron_adamoe.hf.finetune_checks import check, checkpoint_dir
from megatron_adamoe.hf.finetune_data import BlockDataset

logger = logging.getLogger("megatron_adamoe.finetune")


def build_parser() -> argparse.ArgumentParser:
    return finetune_flags.build_parser(__doc__)


def parse_flags(argv: Optional[list] = None):
    """The options of ``argv`` (and of its ``--config`` recipe)."""
    return finetune_flags.parse_flags(build_parser(), argv)


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
    from transformers import AutoTokenizer

    from megatron_adamoe.hf.finetune_launch import watch_launchers
    from megatron_adamoe.hf.finetune_trainer import make_stop_callback

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if options.deepspeed is not None:
        from megatron_adamoe.deepspeed.extension import wait_until_built

        wait_until_built(local_rank)
    tokenizer = AutoTokenizer.from_pretrained(options.model)
    dataset = _dataset(options, tokenizer)
    model = _load_model(options)
    _check_vocabulary(dataset, model, options.model)
    _set_steps(options, len(dataset))
    if options.method == "ada-k":
        from megatron_adamoe.adak.finetune import train_allocators

        return train_allocators(options, model, dataset)
    if options.method == "mo-lora":
        from megatron_adamoe.adapters import apply_mo_lora
        from megatron_adamoe.hf.finetune_checks import mo_lora_config

        torch.manual_seed(options.seed)  # the same adapters on every rank and in every run
        apply_mo_lora(model, mo_lora_config(options))
    else:
        if options.aux_loss_coef is not None:
            model.config.router_aux_loss_coef = options.aux_loss_coef
        if options.method in ("lora", "qlora"):
            from megatron_adamoe.adapters.peft_lora import apply_lora
            from megatron_adamoe.hf.finetune_checks import lora_config

            torch.manual_seed(options.seed)
            model = apply_lora(model, lora_config(options), quantized=options.method == "qlora")
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
    elif options.method in ("lora", "qlora"):
        _save_lora(trainer, model, options.output_dir)
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

        # full: gather each MoE block whole (trainable experts on varying rows); the adapter
        # methods train without it (their frozen experts are gathered per call)
        if options.method == "full":
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
        if options.method != "mo-lora":
            callbacks.insert(0, make_controller_callback()(model, options.load_controller_rate))
        return make_trainer_class(options.method)(
            model=model,
            args=arguments,
            train_dataset=dataset,
            metrics_file=options.metrics_file,
            callbacks=callbacks,
            supervised=options.data_format == "supervised",
            data_collator=getattr(dataset, "collate", None),
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
    from megatron_adamoe.hf.merge_lora import register_auto_classes
    from megatron_adamoe.storage import atomic_directory

    is_writer = trainer.is_world_process_zero()
    with atomic_directory(out, "saving the fine-tuned model", shared=True, owner=is_writer) as tmp:
        register_auto_classes(model, tokenizer)
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


def _save_lora(trainer, model, out: str) -> None:
    """PEFT's adapter files and the routers' buffers (the controller's null bias moved), written
    next to ``out`` by rank 0 and renamed when complete; every rank gathers (ZeRO-3)."""
    from megatron_adamoe.adapters.peft_lora import save_lora
    from megatron_adamoe.storage import atomic_directory

    is_writer = trainer.is_world_process_zero()
    state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    with atomic_directory(out, "saving the LoRA adapters", shared=True, owner=is_writer) as tmp:
        if is_writer:
            save_lora(model, tmp, state_dict=state)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def _dataset(options, tokenizer):
    """Blocks of text, or supervised examples (--data-format; auto: by the first record)."""
    from megatron_adamoe.data.corpus import iter_documents
    from megatron_adamoe.hf.finetune_data import (
        SupervisedDataset,
        is_supervised,
        read_examples,
    )

    supervised = options.data_format == "supervised" or (
        options.data_format == "auto" and is_supervised(options.data)
    )
    options.data_format = "supervised" if supervised else "text"
    if not supervised:
        return BlockDataset(
            iter_documents(options.data, options.json_key),
            tokenizer,
            options.seq_length,
            options.seed,
        )
    examples = read_examples(options.data, options.mc_template)
    dataset = SupervisedDataset(examples, tokenizer, options.seq_length, options.seed)
    if dataset.truncated:
        logger.warning(
            "%d of %d prompts lost their first tokens to fit --seq-length %d",
            dataset.truncated,
            len(dataset),
            options.seq_length,
        )
    return dataset


def _load_model(options):
    """The base model in fp32 (bf16 with --bf16); for qlora its linears in 4 bits (NF4)."""
    from transformers import AutoModelForCausalLM

    from megatron_adamoe.hf.versions import dtype_kwarg

    dtype = torch.bfloat16 if options.bf16 else torch.float32
    kwargs = {dtype_kwarg(): dtype}
    if options.method == "qlora":
        from megatron_adamoe.adapters.peft_lora import quantization_config

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        kwargs.update(quantization_config=quantization_config(dtype), device_map={"": device})
    return AutoModelForCausalLM.from_pretrained(options.model, **kwargs)


def _set_steps(options, blocks: int) -> None:
    """Log the steps per epoch; --num-epochs sets max_steps from them and
    --aux-loss-coef-per-epoch becomes the piecewise schedule over those epochs."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    batch = options.per_device_batch_size * options.gradient_accumulation_steps * world
    per_epoch = blocks // batch
    logger.info(
        "%d %s: %d optimizer steps per epoch (global batch %d)",
        blocks,
        f"blocks of {options.seq_length} tokens"
        if options.data_format == "text"
        else "supervised examples",
        per_epoch,
        batch,
    )
    if options.num_epochs is None:
        return
    if per_epoch < 1:
        raise OptionError(
            f"num_epochs ({options.num_epochs}) needs at least one step per epoch: the data make "
            f"{blocks} rows (blocks or examples) for a global batch of {batch}; add data or lower "
            "--seq-length / the batch"
        )
    options.max_steps = options.num_epochs * per_epoch
    coefficients = options.aux_loss_coef_per_epoch
    if coefficients is not None:
        pieces = [f"{coefficients[0]}"] + [
            f"{epoch * per_epoch}:{value}" for epoch, value in enumerate(coefficients[1:], 1)
        ]
        options.aux_loss_coef_schedule = "piecewise:" + ",".join(pieces)
        logger.info("aux-loss coefficient per epoch: %s", options.aux_loss_coef_schedule)


def _check_vocabulary(dataset, model, model_dir: str) -> None:
    largest = dataset.largest_id
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


_WRITES = {
    "full": "fine-tuned model",
    "lora": "LoRA adapters",
    "qlora": "QLoRA adapters",
    "mo-lora": "Mo-LoRA adapters",
    "ada-k": "Ada-K allocators",
}


def main(argv: Optional[list] = None) -> int:
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        options = parse_flags(argv)
        quiet_fine_tuning_noise(options.gradient_accumulation_steps)
        out = finetune(options)
    except OptionError as error:
        return report(error, rank, world)
    if out is not None:
        logger.info("%s written to %s", _WRITES[options.method], out)
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
