"""The pretraining loop: set-up on Megatron-Core primitives, train, evaluate, log, checkpoint."""

from __future__ import annotations

import json
import logging
import os
import random
import time
from datetime import timedelta
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.module import Float16Module
from megatron.core.transformer.moe.moe_utils import track_moe_metrics
from megatron.core.utils import get_batch_on_this_cp_rank

from megatron_adamoe.errors import OptionError
from megatron_adamoe.mcore import adamoe_metric_names, enable_cpu_mode, set_adamoe_training_step
from megatron_adamoe.mcore.router import k_eff_metric_names
from megatron_adamoe.training import checkpointing, corpus, data, metrics
from megatron_adamoe.training.arguments import PretrainArguments, padded_vocab_size
from megatron_adamoe.training.model import build_model, check_device_support, transformer_config

logger = logging.getLogger("megatron_adamoe.pretrain")


def initialize_distributed(args: PretrainArguments) -> bool:
    """Process group (NCCL on GPU, gloo on CPU), Megatron's parallel state and seeds."""
    on_gpu = torch.cuda.is_available()
    if not on_gpu:
        enable_cpu_mode()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        _init_process_group("nccl" if on_gpu else "gloo", timedelta(minutes=10))
    if dist.get_world_size() != args.world_size:
        raise OptionError(f"world size ({dist.get_world_size()}) must match the one the options "
                         f"were checked for ({args.world_size}); launch with torchrun")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
    )
    # Megatron's _set_random_seed: one seed per pipeline stage, model-parallel RNG states.
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return on_gpu


def _init_process_group(backend: str, timeout: timedelta) -> None:
    """env:// initialisation; under torchrun, on a store prefix of its own per restart attempt.

    torchrun's agent keeps one TCPStore for the life of the job. Restarted workers
    (``--max-restarts``) would otherwise find the previous attempt's keys under the same group
    names and try to connect to the dead workers' addresses.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        dist.init_process_group(backend, timeout=timeout)
        return
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timeout)
    dist.init_process_group(
        backend, store=dist.PrefixStore(f"megatron_adamoe/attempt_{attempt}", store),
        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)


def build_optimizer(args: PretrainArguments, config, model):
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


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron's three-value loss: (token loss sum, token count, report). The schedule divides by
    the count and the micro-batches (no context-parallel rescaling, unlike the two-value form);
    the report carries [sum, count] so logged losses are exact token means."""
    losses = output_tensor.float().view(-1)
    mask = loss_mask.float().view(-1)
    loss_sum = torch.sum(losses * mask)
    num_tokens = mask.sum().to(torch.int)
    report = {"lm loss": torch.stack([loss_sum.detach(), num_tokens.float()])}
    return loss_sum, num_tokens, report


def _forward_step(data_iterator, model):
    batch = get_batch_on_this_cp_rank(next(data_iterator))  # this rank's chunks under CP > 1
    output = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _run_batches(args, model, iterator, forward_only: bool) -> torch.Tensor:
    """One global batch through Megatron's schedule; returns the world-summed [loss, tokens]."""
    results = get_forward_backward_func()(
        forward_step_func=_forward_step,
        data_iterator=iterator,
        model=[model],
        num_microbatches=args.num_microbatches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )
    stats = torch.zeros(2, dtype=torch.float32, device=_device())
    for record in results:  # empty except on the last pipeline stage
        stats += record["lm loss"].to(stats.device)
    # Every last-stage rank of a data-parallel replica holds the same sums (TP) or its share
    # (CP); the ratio of world sums is the mean token loss either way.
    dist.all_reduce(stats)
    return stats


def _device():
    return torch.cuda.current_device() if torch.cuda.is_available() else "cpu"


def evaluate(args, model, valid_dataset) -> float:
    model.eval()
    iterator = data.microbatch_iterator(valid_dataset, args, 0, args.eval_iters, _device())
    total = torch.zeros(2, dtype=torch.float32, device=_device())
    with torch.no_grad():
        for _ in range(args.eval_iters):
            total += _run_batches(args, model, iterator, forward_only=True)
    model.train()
    return float(total[0] / total[1])


def _append_metrics(path, record: dict) -> None:
    if path is None or dist.get_rank() != 0:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def pretrain(args: PretrainArguments) -> None:
    setup(args)()


def setup(args: PretrainArguments):
    """Everything before the first step: process groups, model, optimizer, checkpoint, data.

    Mistakes in the options surface here as one-line ValueErrors; the returned callable trains
    (and evaluates, logs, saves), where any error keeps its full traceback.
    """
    check_device_support(args, torch.cuda.is_available())
    on_gpu = initialize_distributed(args)
    if args.bf16 and not on_gpu:
        logger.warning("bf16 is ignored on CPU: training in fp32")
    tokenizer = corpus.load_tokenizer(args.tokenizer_model)
    config = transformer_config(args, on_gpu)
    model = build_model(args, config, tokenizer.vocab_size)
    if config.bf16:  # as Megatron-LM's get_model: bf16 inputs in, fp32 logits/loss out
        model = Float16Module(config, model)
    model = DistributedDataParallel(
        config,
        DistributedDataParallelConfig(
            grad_reduce_in_fp32=config.bf16,
            use_distributed_optimizer=args.use_distributed_optimizer,
            check_for_nan_in_grad=True,
        ),
        model,
    )
    optimizer, scheduler = build_optimizer(args, config, model)
    # What Megatron's training loop wires into the config for its schedules: data-parallel
    # gradient reduction (and embedding/SP/expert-bias finalisation) after the last micro-batch,
    # no gradient sync between micro-batches, and the loss scale.
    config.no_sync_func = model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    position = checkpointing.load_checkpoint(args, model, optimizer, scheduler)
    train_dataset, valid_dataset = data.build_datasets(args, tokenizer)
    vocab = padded_vocab_size(tokenizer.vocab_size, args)
    writer = metrics.RecordingWriter(
        metrics.open_tensorboard(args.tensorboard_dir) if _is_logging_rank() else None)
    wandb_run = _open_wandb(args)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("AdaMoE GPT: %d layers (MoE %s), n=%d true + m=%d null experts, top-%d; "
                "%.2fM parameters on this rank; TP=%d PP=%d EP=%d DP=%d; %s",
                args.num_layers, metrics.moe_layer_indices(args), args.num_experts,
                args.adamoe_num_null_experts,
                args.moe_router_topk, num_params / 1e6, args.tensor_model_parallel_size,
                args.pipeline_model_parallel_size, args.expert_model_parallel_size,
                args.data_parallel_size, "GPU" if on_gpu else "CPU (gloo)")
    if position.iteration:
        logger.info("resuming at iteration %d (%d samples consumed)", position.iteration,
                    position.consumed_samples)
    return partial(_train, args, config, model, optimizer, scheduler, position, train_dataset,
                   valid_dataset, vocab, writer, wandb_run)


def _train(args, config, model, optimizer, scheduler, position, train_dataset, valid_dataset,
           vocab, writer, wandb_run) -> None:
    if args.skip_train:
        _log_validation(args, model, valid_dataset, position.iteration, writer)
        writer.close()
        _shutdown()
        return
    train_iterator = data.microbatch_iterator(
        train_dataset, args, position.consumed_samples, args.train_iters - position.iteration,
        _device())
    report = _Reporter(args, config, vocab, writer, wandb_run)
    model.train()
    saved_at = position.iteration  # the checkpoint this run resumed from (or none, at 0)
    while position.iteration < args.train_iters:
        step_started = time.time()
        set_adamoe_training_step(model, position.iteration)
        model.zero_grad_buffer()
        optimizer.zero_grad()
        stats = _run_batches(args, model, train_iterator, forward_only=False)
        update_ok, grad_norm, _ = optimizer.step()
        if update_ok:
            scheduler.step(increment=args.global_batch_size)
        position.iteration += 1
        position.consumed_samples += args.global_batch_size
        report.iteration(position, float(stats[0] / stats[1]), optimizer.param_groups[0]["lr"],
                         grad_norm, time.time() - step_started)
        if args.eval_interval and (position.iteration % args.eval_interval == 0
                                   or position.iteration == args.train_iters):
            _log_validation(args, model, valid_dataset, position.iteration, writer)
        if args.save and args.save_interval and position.iteration % args.save_interval == 0:
            _save(args, position, model, optimizer, scheduler)
            saved_at = position.iteration
        if args.exit_interval and position.iteration % args.exit_interval == 0:
            logger.info("exiting at iteration %d (exit_interval)", position.iteration)
            break
    if args.save and saved_at != position.iteration:
        _save(args, position, model, optimizer, scheduler)
    writer.close()
    logger.info("done: %d iterations in %s", position.iteration,
                metrics.format_duration(report.elapsed()))
    _shutdown()


class _Reporter:
    """Per iteration: Megatron's MoE metrics, TensorBoard/W&B scalars, the metrics file, and
    every ``log_interval`` an iteration line (timed over training steps only)."""

    def __init__(self, args, config, vocab_size, writer, wandb_run) -> None:
        self.args, self.vocab_size = args, vocab_size
        self.writer, self.wandb_run = writer, wandb_run
        self.track_names = list(adamoe_metric_names(config))
        self.k_eff_names = k_eff_metric_names(config.moe_router_topk)
        self.moe_layers = metrics.moe_layer_indices(args)
        self.started = time.time()
        self.window_seconds, self.window_iterations = 0.0, 0

    def elapsed(self) -> float:
        return time.time() - self.started

    def iteration(self, position, loss: float, lr: float, grad_norm, step_seconds: float) -> None:
        args, writer, step = self.args, self.writer, position.iteration
        moe_losses: dict = {}
        track_moe_metrics(
            loss_scale=1.0 / args.num_microbatches, iteration=step, writer=writer,
            wandb_writer=self.wandb_run, total_loss_dict=moe_losses, per_layer_logging=True,
            track_names=self.track_names, num_layers=args.num_layers,
            moe_layer_freq=args.moe_layer_freq,
        )
        per_layer = writer.per_layer("adamoe/load")
        loads = {i: per_layer[i] for i in self.moe_layers if i in per_layer}
        flops_ratio = None
        if len(loads) == len(self.moe_layers):
            flops_ratio = metrics.flops_ratio_vs_topk(
                args, self.vocab_size, [loads[i] for i in self.moe_layers])
            writer.add_scalar("adamoe/flops_vs_topk", flops_ratio, step)
        writer.add_scalar("lm loss", loss, step)
        writer.add_scalar("learning-rate", lr, step)
        if grad_norm is not None:
            writer.add_scalar("grad-norm", grad_norm, step)
        k_eff = [writer.per_layer(name) for name in self.k_eff_names]
        _append_metrics(args.adamoe_metrics_file, {
            "iteration": step, "lm loss": loss, "lr": lr, "grad norm": grad_norm,
            "step time": step_seconds,
            "load": [loads.get(i) for i in self.moe_layers], "flops vs topk": flops_ratio,
            "k_eff": [[fractions.get(i) for fractions in k_eff] for i in self.moe_layers],
            **{name: float(value) for name, value in moe_losses.items()}})
        self.window_seconds += step_seconds
        self.window_iterations += 1
        if step % args.log_interval and step != args.train_iters:
            return
        losses = {"lm loss": loss}
        if "load_balancing_loss" in moe_losses:
            losses["load balancing loss"] = float(moe_losses["load_balancing_loss"])
        logger.info(metrics.iteration_line(
            args, step, position.consumed_samples, self.window_seconds / self.window_iterations,
            lr, losses, grad_norm, self.elapsed(), loads, flops_ratio))
        writer.flush()
        self.window_seconds, self.window_iterations = 0.0, 0


def _shutdown() -> None:
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def _log_validation(args, model, valid_dataset, iteration, writer) -> None:
    loss = evaluate(args, model, valid_dataset)
    writer.add_scalar("lm loss validation", loss, iteration)
    _append_metrics(args.adamoe_metrics_file, {"iteration": iteration, "validation lm loss": loss})
    logger.info("-" * 80)
    logger.info(" validation loss at iteration %d | lm loss value: %.6E | lm loss PPL: %.6E |",
                iteration, loss, float(np.exp(min(20.0, loss))))
    logger.info("-" * 80)


def _save(args, position, model, optimizer, scheduler) -> None:
    started = time.time()
    directory = checkpointing.save_checkpoint(args, position, model, optimizer, scheduler)
    logger.info("saved checkpoint %s in %.1f s", directory, time.time() - started)


def _is_logging_rank() -> bool:
    return dist.get_rank() == 0


def _open_wandb(args: PretrainArguments):
    if args.wandb_project is None or not _is_logging_rank():
        return None
    try:
        import wandb
    except ImportError:
        logger.warning("wandb_project is set but wandb is not installed: W&B logging is off")
        return None
    return wandb.init(project=args.wandb_project, config=args.to_dict())
