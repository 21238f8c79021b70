"""The pretraining loop as one object, on Megatron-Core primitives.

``Trainer(args)`` sets everything up (process groups, model, DDP, optimizer and scheduler, the
checkpoint to resume from, data, reporting); ``train()`` runs the loop: ``train_step`` (Megatron's
forward-backward schedule, the optimizer step, reporting, the guards), ``validate`` every
``eval_interval``, ``save`` every ``save_interval``, at ``exit_interval``, on SIGTERM and at the
end. Set-up mistakes are one-line ``OptionError``s; a tripped guard is a one-line
``TrainingHalted`` and saves nothing; anything else keeps its traceback.
"""

from __future__ import annotations

import logging
import time
from functools import partial

import torch
import torch.distributed as dist
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.rerun_state_machine import get_rerun_state_machine
from megatron.core.transformer.module import Float16Module

from megatron_adamoe.data import corpus
from megatron_adamoe.errors import TrainingHalted
from megatron_adamoe.mcore import finalize_model_grads_with_load_control, set_adamoe_training_step
from megatron_adamoe.mcore._compat import batch_on_this_cp_rank
from megatron_adamoe.mcore.checkpoint_writer import start_write_results_queue
from megatron_adamoe.options import PretrainArguments
from megatron_adamoe.training import checkpointing, data, distributed, metrics
from megatron_adamoe.training.guards import NOT_SAVED, TrainingGuard
from megatron_adamoe.training.model import build_model, check_device_support, transformer_config
from megatron_adamoe.training.reporting import Reporter
from megatron_adamoe.training.signals import ExitSignalHandler

logger = logging.getLogger("megatron_adamoe.pretrain")


class Trainer:
    def __init__(self, args: PretrainArguments) -> None:
        check_device_support(args, torch.cuda.is_available())
        self.args = args
        self.on_gpu = distributed.initialize(args)
        if args.bf16 and not self.on_gpu:
            logger.warning("bf16 is ignored on CPU: training in fp32")
        tokenizer = corpus.load_tokenizer(args.tokenizer_model)
        self.config = transformer_config(args, self.on_gpu)
        self.model = _wrap(self.config, build_model(args, self.config, tokenizer.vocab_size), args)
        self.optimizer, self.scheduler = build_optimizer(args, self.config, self.model)
        # What Megatron's training loop wires into the config for its schedules: data-parallel
        # gradient reduction (and embedding/SP/expert-bias finalisation, then the null-bias
        # controller step) after the last micro-batch, no gradient sync between micro-batches,
        # and the loss scale.
        self.config.no_sync_func = self.model.no_sync
        self.config.finalize_model_grads_func = finalize_model_grads_with_load_control
        self.config.grad_scale_func = self.optimizer.scale_loss
        self.position = checkpointing.load_checkpoint(
            args, self.model, self.optimizer, self.scheduler
        )
        if args.save:
            start_write_results_queue()  # its helper process dies with this rank
        self.train_dataset, self.valid_dataset = data.build_datasets(args, tokenizer)
        vocab_size = args.padded_vocab_size(tokenizer.vocab_size)
        self.reporter = Reporter(args, self.config, vocab_size)
        self.guard = TrainingGuard(
            args.adamoe_loss_spike_factor,
            args.adamoe_loss_spike_window,
            args.adamoe_min_load,
            args.adamoe_min_load_steps,
            vocab_size=vocab_size,
            dead_grad_steps=args.adamoe_dead_grad_steps,
        )
        self._log_start()

    # --- the loop --------------------------------------------------------------------------
    def train(self) -> None:
        """Train to ``train_iters`` (or evaluate once under ``skip_train``), then shut down."""
        args, position = self.args, self.position
        if args.skip_train:
            self.validate()
            self.close()
            return
        iterator = data.microbatch_iterator(
            self.train_dataset,
            args,
            position.consumed_samples,
            args.train_iters - position.iteration,
            distributed.device(),
        )
        signals = ExitSignalHandler() if args.exit_signal_handler else None
        saved_at = position.iteration  # the checkpoint this run resumed from (or none, at 0)
        save_due = False
        self.model.train()
        try:
            while position.iteration < args.train_iters:
                self.train_step(iterator)
                if args.eval_interval and (
                    position.iteration % args.eval_interval == 0
                    or position.iteration == args.train_iters
                ):
                    self.validate()
                if args.save and args.save_interval:
                    # A save due while a layer is under the load floor waits for it to recover.
                    save_due = save_due or position.iteration % args.save_interval == 0
                    if save_due and not self.guard.holding_back:
                        self.save()
                        saved_at, save_due = position.iteration, False
                if signals is not None and signals.received_anywhere(distributed.device()):
                    logger.info(
                        "exit signal received: stopping after iteration %d", position.iteration
                    )
                    break
                if args.exit_interval and position.iteration % args.exit_interval == 0:
                    logger.info("exiting at iteration %d (exit_interval)", position.iteration)
                    break
            if args.save and saved_at != position.iteration:
                self.save()
        finally:
            if signals is not None:
                signals.restore()
        logger.info(
            "done: %d iterations in %s",
            position.iteration,
            metrics.format_duration(self.reporter.elapsed()),
        )
        self.close()

    def train_step(self, iterator) -> dict[int, float]:
        """One global batch: forward-backward, optimizer step, report, guards. Returns the
        measured load of each MoE layer."""
        args, position = self.args, self.position
        started = time.time()
        set_adamoe_training_step(self.model, position.iteration)
        # Megatron's NaN/Inf gradient checks report the rerun state machine's iteration.
        get_rerun_state_machine().current_iteration = position.iteration + 1
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        try:
            stats = self._run_batches(iterator, forward_only=False)
        except RuntimeError as error:
            if "Unexpected result" in str(error) and ("NaN" in str(error) or "Inf" in str(error)):
                raise TrainingHalted(
                    f"gradients are not finite at iteration "
                    f"{position.iteration + 1} (Megatron's check: "
                    f"{str(error).split(chr(10))[0]}); {NOT_SAVED}; lower lr "
                    "or check the data"
                ) from None
            raise
        update_ok, grad_norm, _ = self.optimizer.step()
        if update_ok:
            self.scheduler.step(increment=args.global_batch_size)
        position.iteration += 1
        position.consumed_samples += args.global_batch_size
        loss = float(stats[0] / stats[1])
        loads = self.reporter.iteration(
            position, loss, self.optimizer.param_groups[0]["lr"], grad_norm, time.time() - started
        )
        self.guard.check(position.iteration, loss, loads, grad_norm)
        return loads

    def evaluate(self) -> float:
        """Mean token loss over the fixed validation set (the first ``eval_iters`` batches)."""
        args = self.args
        self.model.eval()
        iterator = data.microbatch_iterator(
            self.valid_dataset, args, 0, args.eval_iters, distributed.device()
        )
        total = torch.zeros(2, dtype=torch.float32, device=distributed.device())
        with torch.no_grad():
            for _ in range(args.eval_iters):
                total += self._run_batches(iterator, forward_only=True)
        self.model.train()
        return float(total[0] / total[1])

    def validate(self) -> float:
        loss = self.evaluate()
        self.reporter.validation(self.position.iteration, loss)
        return loss

    def save(self) -> None:
        started = time.time()
        directory = checkpointing.save_checkpoint(
            self.args, self.position, self.model, self.optimizer, self.scheduler
        )
        logger.info("saved checkpoint %s in %.1f s", directory, time.time() - started)

    def close(self) -> None:
        self.reporter.close()
        distributed.shutdown()

    # --- helpers ---------------------------------------------------------------------------
    def _run_batches(self, iterator, forward_only: bool) -> torch.Tensor:
        """One global batch through Megatron's schedule; the world-summed [loss sum, tokens]."""
        args = self.args
        results = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iterator,
            model=[self.model],
            num_microbatches=args.num_microbatches,
            seq_length=args.seq_length,
            micro_batch_size=args.micro_batch_size,
            forward_only=forward_only,
        )
        stats = torch.zeros(2, dtype=torch.float32, device=distributed.device())
        for record in results:  # empty except on the last pipeline stage
            stats += record["lm loss"].to(stats.device)
        # Every last-stage rank of a data-parallel replica holds the same sums (TP) or its share
        # (CP); the ratio of world sums is the mean token loss either way.
        dist.all_reduce(stats)
        return stats

    def _log_start(self) -> None:
        args = self.args
        num_params = sum(p.numel() for p in self.model.parameters())
        model = (
            f"dense GPT: {args.num_layers} layers, "
            f"FFN {args.ffn_hidden_size or 4 * args.hidden_size}"
            if args.is_dense
            else f"AdaMoE GPT: {args.num_layers} layers (MoE {args.moe_layer_indices()}), "
            f"n={args.num_experts} true + m={args.adamoe_num_null_experts} null experts, "
            f"top-{args.moe_router_topk}"
        )
        logger.info(
            "%s; %.2fM parameters on this rank; TP=%d PP=%d EP=%d DP=%d; %s",
            model,
            num_params / 1e6,
            args.tensor_model_parallel_size,
            args.pipeline_model_parallel_size,
            args.expert_model_parallel_size,
            args.data_parallel_size,
            "GPU" if self.on_gpu else "CPU (gloo)",
        )
        if self.position.iteration:
            logger.info(
                "resuming at iteration %d (%d samples consumed)",
                self.position.iteration,
                self.position.consumed_samples,
            )


def _wrap(config, model, args: PretrainArguments):
    """As Megatron-LM's get_model: Float16Module under bf16 (bf16 in, fp32 logits and loss out),
    then Megatron's DistributedDataParallel."""
    if config.bf16:
        model = Float16Module(config, model)
    return DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=config.bf16,
            use_distributed_optimizer=args.use_distributed_optimizer,
            check_for_nan_in_grad=True,
        ),
        model,
    )


def build_optimizer(args: PretrainArguments, config, model):
    """Megatron's Adam (the distributed optimizer when asked) and its LR/WD scheduler."""
    optimizer_config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(optimizer_config, [model])
    gbs = args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * gbs,
        lr_decay_steps=(args.lr_decay_iters or args.train_iters) * gbs,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters * gbs,
        wd_incr_style="constant",
        # The run's options, not the checkpoint's, set the schedule (the resolved config.yaml
        # records them); the step count still comes from the checkpoint.
        use_checkpoint_opt_param_scheduler=False,
        override_opt_param_scheduler=True,
    )
    return optimizer, scheduler


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's three-value loss: (token loss sum, token count, report). The schedule divides by
    the count and the micro-batches (no context-parallel rescaling, unlike the two-value form);
    the report carries [sum, count] so logged losses are exact token means."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}
    return loss_sum, num_tokens, report


def forward_step(data_iterator, model):
    batch = batch_on_this_cp_rank(next(data_iterator))  # this rank's chunks under CP > 1
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return output, partial(loss_func, batch["loss_mask"])
