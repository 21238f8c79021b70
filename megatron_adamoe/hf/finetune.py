"""Fine-tune an AdaMoE model in Hugging Face form with the HF Trainer, optionally under DeepSpeed
ZeRO (``python -m megatron_adamoe.hf.finetune`` / ``adamoe-finetune``): the paper's workflow.

    adamoe-finetune --model hf/adamoe_mixtral --data train.jsonl --output-dir out/ \\
        --deepspeed configs/deepspeed/zero3.json --max-steps 1000 --learning-rate 1e-5
    torchrun --nproc-per-node 8 -m megatron_adamoe.hf.finetune ...   # or: deepspeed -m ...

Data: ``.jsonl`` (``--json-key``, default "text") or text files, tokenized with the model's own
tokenizer, each document ended with EOS, concatenated and cut into ``--seq-length`` blocks,
shuffled once with ``--seed`` and then read in that order (the same blocks in the same steps
whatever the data-parallel layout). The loss is the LM loss plus ``--aux-loss-coef`` x the
null-aware load-balancing loss summed over MoE layers (``output_router_logits``); a model with a
null bias keeps its load at ``router_target_load`` with the controller
(``--load-controller-rate``). Logs: loss, aux loss and the measured load per layer (averaged over
ranks), to stdout and ``--metrics-file``. The result is an HF directory that ``from_pretrained``
loads. CPU runs use gloo; GPU runs NCCL (and ``--bf16``). DeepSpeed's CPU communication extension is
built once by local rank 0 before any rank initialises DeepSpeed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional

import torch

from megatron_adamoe.errors import OptionError, report

logger = logging.getLogger("megatron_adamoe.finetune")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adamoe-finetune",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    add = parser.add_argument
    add("--model", required=True, help="an AdaMoE HF directory (export-hf, mixtral-to-adamoe)")
    add("--data", required=True, nargs="+", help=".jsonl or text files")
    add("--json-key", default="text")
    add("--output-dir", required=True, help="where the fine-tuned HF model is written")
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
        help="load-balancing coefficient per MoE layer (default: the model's)",
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
    add("--logging-steps", type=int, default=10)
    add("--seed", type=int, default=1234)
    add("--bf16", action="store_true", help="bf16 (GPU)")
    add("--metrics-file", default=None, help="JSON lines, one per logging step (rank 0)")
    # The deepspeed launcher passes --local_rank=N (it also sets LOCAL_RANK, which is read).
    add("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def check(options) -> None:
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
        if getattr(options, name) <= 0:
            raise OptionError(
                f"{name} ({getattr(options, name)}) must be > 0; pass a positive "
                f"--{name.replace('_', '-')}"
            )
    if options.aux_loss_coef is not None and options.aux_loss_coef < 0:
        raise OptionError(
            f"aux_loss_coef ({options.aux_loss_coef}) must be >= 0; use 0 to turn "
            "the load-balancing loss off"
        )
    if not os.path.isfile(os.path.join(options.model, "config.json")):
        raise OptionError(
            f"model ({options.model!r}) must be an HF model directory with "
            "config.json; run adamoe-convert export-hf or mixtral-to-adamoe"
        )
    if options.deepspeed is not None and not os.path.isfile(options.deepspeed):
        raise OptionError(
            f"deepspeed ({options.deepspeed!r}) must be an existing DeepSpeed "
            "config; see configs/deepspeed/"
        )
    if os.path.exists(options.output_dir) and os.listdir(options.output_dir):
        raise OptionError(
            f"output_dir ({options.output_dir!r}) must be empty or new; pick another path"
        )


class BlockDataset(torch.utils.data.Dataset):
    """Token blocks of ``seq_length``: documents + EOS, concatenated, cut, shuffled once."""

    def __init__(self, documents, tokenizer, seq_length: int, seed: int) -> None:
        stream: list[int] = []
        for text in documents:
            stream += tokenizer(text, add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                stream.append(tokenizer.eos_token_id)
        count = len(stream) // seq_length
        if count == 0:
            raise OptionError(
                f"data must hold at least seq_length ({seq_length}) tokens; it has "
                f"{len(stream)}: add text or lower --seq-length"
            )
        blocks = torch.tensor(stream[: count * seq_length]).view(count, seq_length)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
        self.blocks = blocks[order]

    def __len__(self) -> int:
        return self.blocks.size(0)

    def __getitem__(self, index: int) -> dict:
        tokens = self.blocks[index]
        return {
            "input_ids": tokens,
            "labels": tokens.clone(),
            "attention_mask": torch.ones_like(tokens),
        }


def moe_blocks(model) -> list:
    from megatron_adamoe.hf.modeling_adamoe import AdaMoESparseMoeBlock

    return [m for m in model.modules() if isinstance(m, AdaMoESparseMoeBlock)]


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values)
    return values


def make_trainer_class():
    from transformers import Trainer

    class AdaMoETrainer(Trainer):
        """The HF Trainer plus AdaMoE's logging: aux loss and measured load per MoE layer, summed
        over every micro-batch and rank since the last log; and the load controller step."""

        loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

        def __init__(self, *args, controller_rate: float = 0.01, metrics_file=None, **kwargs):
            super().__init__(*args, **kwargs)
            self.controller_rate, self.metrics_file = controller_rate, metrics_file
            self.window = None  # [aux sum, micro-batches, per layer: true picks, tokens, empty]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            outputs = model(**inputs, output_router_logits=True)
            blocks = moe_blocks(model)
            stats = torch.tensor(
                [float(outputs.aux_loss.detach()), 1.0]
                + [value for block in blocks for value in block.last_counts],
                dtype=torch.float64,
            )
            self.window = stats if self.window is None else self.window + stats
            return (outputs.loss, outputs) if return_outputs else outputs.loss

        def log(self, logs: dict, *args, **kwargs) -> None:
            if self.window is not None and "loss" in logs:
                totals = _all_reduce(self.window.clone())
                layers = totals[2:].view(-1, 3)
                logs["aux_loss"] = float(totals[0] / totals[1])
                logs["load"] = [round(float(p / max(t, 1)), 4) for p, t, _ in layers]
                logs["empty_expert_batches"] = int(layers[:, 2].sum())
                self.window = None
                if self.metrics_file and self.is_world_process_zero():
                    with open(self.metrics_file, "a") as handle:
                        handle.write(json.dumps({"step": self.state.global_step, **logs}) + "\n")
            super().log(logs, *args, **kwargs)

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)  # pre-shuffled blocks

    return AdaMoETrainer


def make_controller_callback():
    from transformers import TrainerCallback

    class LoadControllerCallback(TrainerCallback):
        """After each optimizer step: every MoE block's [true picks, tokens] of the step, summed
        over ranks, moves its null bias by rate x (load - target) (megatron_adamoe.mcore's
        controller, in HF form): the same on every rank."""

        def __init__(self, model, rate: float) -> None:
            self.blocks = [
                b for b in moe_blocks(model) if getattr(b, "null_bias", None) is not None
            ]
            targets = model.config.router_target_load
            self.targets = targets if isinstance(targets, list) else [targets] * len(self.blocks)
            self.rate = rate

        def on_step_end(self, args, state, control, **kwargs):
            if not self.blocks:
                return
            counts = _all_reduce(
                torch.stack(
                    [
                        b.step_counts
                        if b.step_counts is not None
                        else torch.zeros(2, dtype=torch.float64)
                        for b in self.blocks
                    ]
                ).to(self.blocks[0].null_bias.device)
            )
            with torch.no_grad():
                for block, (picks, tokens), target in zip(self.blocks, counts, self.targets):
                    if tokens > 0:
                        block.null_bias += self.rate * (float(picks / tokens) - target)
                    block.step_counts = None

    return LoadControllerCallback


def finetune(options) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    import megatron_adamoe.hf  # noqa: F401  (registers the AdaMoE Auto classes)
    from megatron_adamoe.data.corpus import iter_documents

    check(options)
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
    if options.aux_loss_coef is not None:
        model.config.router_aux_loss_coef = options.aux_loss_coef
    if options.deepspeed is not None and _zero_stage(options.deepspeed) == 3:
        from deepspeed.utils import set_z3_leaf_modules

        from megatron_adamoe.hf.modeling_adamoe import AdaMoESparseMoeBlock

        set_z3_leaf_modules(model, [AdaMoESparseMoeBlock])  # gather each MoE block whole
    arguments = TrainingArguments(
        output_dir=options.output_dir,
        per_device_train_batch_size=options.per_device_batch_size,
        gradient_accumulation_steps=options.gradient_accumulation_steps,
        max_steps=options.max_steps,
        learning_rate=options.learning_rate,
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        logging_steps=options.logging_steps,
        save_strategy="no",
        seed=options.seed,
        bf16=options.bf16,
        gradient_checkpointing=options.gradient_checkpointing,
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
    trainer = make_trainer_class()(
        model=model,
        args=arguments,
        train_dataset=dataset,
        controller_rate=options.load_controller_rate,
        metrics_file=options.metrics_file,
        callbacks=[make_controller_callback()(model, options.load_controller_rate)],
    )
    trainer.train()
    # Saved with the model files (auto_map), so it loads with trust_remote_code as exports do.
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForCausalLM")
    type(tokenizer).register_for_auto_class("AutoTokenizer")
    trainer.save_model(options.output_dir)
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(options.output_dir)
    return options.output_dir


def _zero_stage(path: str) -> int:
    with open(path) as handle:
        return int((json.load(handle).get("zero_optimization") or {}).get("stage", 0))


def _dtype_kwarg() -> str:
    import transformers
    from packaging.version import Version

    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"


def main(argv: Optional[list] = None) -> int:
    options = build_parser().parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")
    try:
        out = finetune(options)
    except OptionError as error:
        return report(error, rank, world)
    logger.info("fine-tuned model written to %s", out)
    return 0


def console_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    sys.exit(main())
