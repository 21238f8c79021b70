"""What a pretraining run reports each iteration: Megatron's MoE metrics (``track_moe_metrics``),
TensorBoard and W&B scalars, the metrics file (JSON lines) and, every ``log_interval``, a
Megatron-style iteration line; and the validation loss."""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Optional

import numpy as np
import torch.distributed as dist

from megatron_adamoe.mcore import adamoe_metric_names
from megatron_adamoe.mcore._compat import report_moe_metrics
from megatron_adamoe.mcore.router import NULL_BIAS_METRIC, k_eff_metric_names
from megatron_adamoe.options import PretrainArguments
from megatron_adamoe.training import metrics
from megatron_adamoe.training.distributed import is_logging_rank

logger = logging.getLogger("megatron_adamoe.pretrain")


class Reporter:
    """Per iteration: Megatron's MoE metrics, TensorBoard/W&B scalars, the metrics file, and
    every ``log_interval`` an iteration line (timed over training steps only)."""

    def __init__(self, args: PretrainArguments, config, vocab_size: int) -> None:
        self.args, self.vocab_size = args, vocab_size
        self.writer = metrics.RecordingWriter(
            metrics.open_tensorboard(args.tensorboard_dir) if is_logging_rank() else None
        )
        self.wandb_run = _open_wandb(args)
        self.track_names = list(adamoe_metric_names(config))
        self.k_eff_names = k_eff_metric_names(config.moe_router_topk)
        self.moe_layers = args.moe_layer_indices()
        self.started = time.time()
        self.window_seconds, self.window_iterations = 0.0, 0

    def elapsed(self) -> float:
        return time.time() - self.started

    def iteration(
        self,
        position,
        loss: float,
        lr: float,
        grad_norm,
        step_seconds: float,
        extra: Optional[dict] = None,
    ) -> dict[int, float]:
        """Report one training iteration; returns the measured load of each MoE layer.
        ``extra``: more per-iteration values for the metrics file and TensorBoard."""
        args, writer, step = self.args, self.writer, position.iteration
        moe_losses: dict = {}
        if self.moe_layers:  # a dense model has no router to report
            self._report_moe(step, writer, moe_losses)
        per_layer = writer.per_layer("adamoe/load")
        loads = {i: per_layer[i] for i in self.moe_layers if i in per_layer}
        flops_ratio = None
        if self.moe_layers and len(loads) == len(self.moe_layers):
            flops_ratio = metrics.flops_ratio_vs_topk(
                args, self.vocab_size, [loads[i] for i in self.moe_layers]
            )
            writer.add_scalar("adamoe/flops_vs_topk", flops_ratio, step)
        writer.add_scalar("lm loss", loss, step)
        writer.add_scalar("learning-rate", lr, step)
        if grad_norm is not None:
            writer.add_scalar("grad-norm", grad_norm, step)
        k_eff = [writer.per_layer(name) for name in self.k_eff_names]
        if NULL_BIAS_METRIC in self.track_names:
            biases = writer.per_layer(NULL_BIAS_METRIC)
            extra = {**(extra or {}), "null bias": [biases.get(i) for i in self.moe_layers]}
        self._append(
            {
                "iteration": step,
                "lm loss": loss,
                "lr": lr,
                "grad norm": grad_norm,
                "step time": step_seconds,
                "load": [loads.get(i) for i in self.moe_layers],
                "flops vs topk": flops_ratio,
                "k_eff": [[fractions.get(i) for fractions in k_eff] for i in self.moe_layers],
                **{name: float(value) for name, value in moe_losses.items()},
                **(extra or {}),
            }
        )
        self.window_seconds += step_seconds
        self.window_iterations += 1
        if not (step % args.log_interval and step != args.train_iters):
            losses = {"lm loss": loss}
            if "load_balancing_loss" in moe_losses:
                losses["load balancing loss"] = float(moe_losses["load_balancing_loss"])
            logger.info(
                metrics.iteration_line(
                    args,
                    step,
                    position.consumed_samples,
                    self.window_seconds / self.window_iterations,
                    lr,
                    losses,
                    grad_norm,
                    self.elapsed(),
                    loads,
                    flops_ratio,
                )
            )
            writer.flush()
            self.window_seconds, self.window_iterations = 0.0, 0
        return loads

    def _report_moe(self, step: int, writer, moe_losses: dict) -> None:
        """Megatron's MoE metrics (aux losses, the AdaMoE trackers) of this iteration."""
        report_moe_metrics(
            loss_scale=1.0 / self.args.num_microbatches,
            iteration=step,
            writer=writer,
            wandb_writer=self.wandb_run,
            total_loss_dict=moe_losses,
            per_layer_logging=True,
            track_names=self.track_names,
            num_layers=self.args.num_layers,
            moe_layer_freq=self.args.moe_layer_freq,
        )

    def validation(self, iteration: int, loss: float) -> None:
        self.writer.add_scalar("lm loss validation", loss, iteration)
        self._append({"iteration": iteration, "validation lm loss": loss})
        logger.info("-" * 80)
        logger.info(
            " validation loss at iteration %d | lm loss value: %.6E | lm loss PPL: %.6E |",
            iteration,
            loss,
            float(np.exp(min(20.0, loss))),
        )
        logger.info("-" * 80)

    def close(self) -> None:
        self.writer.close()

    def _append(self, record: dict) -> None:
        path = self.args.adamoe_metrics_file
        if path is None or dist.get_rank() != 0:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


def _open_wandb(args: PretrainArguments):
    if args.wandb_project is None or not is_logging_rank():
        return None
    try:
        import wandb
    except ImportError:
        logger.warning("wandb_project is set but wandb is not installed: W&B logging is off")
        return None
    return wandb.init(project=args.wandb_project, config=args.to_dict())
