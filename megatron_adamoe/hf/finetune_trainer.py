"""The HF Trainer as adamoe-finetune runs it: AdaMoE's logging, the load controller's step, and a
clean stop on SIGTERM (a checkpoint of the step, then exit). transformers is imported on use."""

from __future__ import annotations

import json
import signal

import torch


def moe_blocks(model) -> list:
    from megatron_adamoe.hf.modeling_adamoe import AdaMoESparseMoeBlock

    return [m for m in model.modules() if isinstance(m, AdaMoESparseMoeBlock)]


def _all_reduce(values: torch.Tensor, op=None) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, **({"op": op} if op is not None else {}))
    return values


def make_trainer_class(method: str = "full"):
    """The Trainer class of a fine-tuning method: "full" (AdaMoE models) or "mo-lora"."""
    from transformers import Trainer

    class AdaMoETrainer(Trainer):
        """The HF Trainer plus AdaMoE's logging: the aux loss (the mean per MoE layer, the scale
        Megatron's "load balancing loss" is logged on; the loss the model adds is the sum over
        layers times the coefficient) and the measured load per MoE layer, summed over every
        micro-batch and rank since the last log."""

        loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean

        def __init__(self, *args, metrics_file=None, supervised=False, **kwargs):
            super().__init__(*args, **kwargs)
            self.metrics_file = metrics_file
            self.supervised = supervised  # the loss: per_example_lm_loss over the labels
            self.num_moe_layers = max(1, len(moe_blocks(self.model)))
            self.window = None  # [aux sum, micro-batches, per layer: true picks, tokens, empty]

        def split_labels(self, inputs: dict):
            """(inputs for the model, labels): supervised data keeps its labels for
            per_example_lm_loss (the model then computes no loss of its own)."""
            if not self.supervised:
                return inputs, None
            return {k: v for k, v in inputs.items() if k != "labels"}, inputs["labels"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from megatron_adamoe.hf.finetune_data import per_example_lm_loss

            inputs, labels = self.split_labels(inputs)
            outputs = model(**inputs, output_router_logits=True)
            if labels is not None:
                coef = self.model.config.router_aux_loss_coef
                outputs.loss = per_example_lm_loss(outputs.logits, labels) + coef * outputs.aux_loss
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
                logs["aux_loss"] = float(totals[0] / totals[1]) / self.num_moe_layers
                logs["load"] = [round(float(p / max(t, 1)), 4) for p, t, _ in layers]
                logs["empty_expert_batches"] = int(layers[:, 2].sum())
                self.window = None
                if self.metrics_file and self.is_world_process_zero():
                    with open(self.metrics_file, "a") as handle:
                        handle.write(json.dumps({"step": self.state.global_step, **logs}) + "\n")
            super().log(logs, *args, **kwargs)

        def _get_train_sampler(self, *args, **kwargs):
            return torch.utils.data.SequentialSampler(self.train_dataset)  # pre-shuffled blocks

    class MoLoRATrainer(AdaMoETrainer):
        """Mo-LoRA on a dense model: the LM loss plus the authors' aux loss
        (``adapters.mo_lora_aux_loss``); logs aux_loss and, per decoder layer, the load (true
        LoRA experts per token and linear) and the k_eff histogram, averaged over the window's
        micro-batches and the ranks."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.num_moe_layers = 1  # aux_loss is logged as added (summed over layers)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            from megatron_adamoe.adapters import mo_lora_aux_loss, routing_statistics
            from megatron_adamoe.adapters.mo_lora_loss import empty_experts, layer_routings
            from megatron_adamoe.hf.finetune_data import per_example_lm_loss

            inputs, labels = self.split_labels(inputs)
            outputs = model(**inputs)
            if labels is not None:
                outputs.loss = per_example_lm_loss(outputs.logits, labels)
            routings = layer_routings(self.model)  # once, for the loss and the statistics
            aux_loss = mo_lora_aux_loss(self.model, routings)
            statistics = routing_statistics(self.model, routings)
            stats = torch.tensor(
                [float(aux_loss.detach()), 1.0, float(empty_experts(self.model))]
                + [v for layer in statistics.values() for v in (layer["load"], *layer["k_eff"])],
                dtype=torch.float64,
            )
            self.window = stats if self.window is None else self.window + stats
            loss = outputs.loss + aux_loss.to(outputs.loss.dtype)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict, *args, **kwargs) -> None:
            if self.window is not None and "loss" in logs:
                totals = _all_reduce(self.window.clone())
                count = float(totals[1])
                width = 2 + self.model.mo_lora_config.topk
                layers = (totals[3:] / count).view(-1, width)
                logs["aux_loss"] = float(totals[0] / count)
                logs["empty_expert_calls"] = int(totals[2])
                logs["load"] = [round(float(row[0]), 4) for row in layers]
                logs["k_eff"] = [[round(float(v), 4) for v in row[1:]] for row in layers]
                self.window = None
                if self.metrics_file and self.is_world_process_zero():
                    with open(self.metrics_file, "a") as handle:
                        handle.write(json.dumps({"step": self.state.global_step, **logs}) + "\n")
            Trainer.log(self, logs, *args, **kwargs)

    return MoLoRATrainer if method == "mo-lora" else AdaMoETrainer


def make_controller_callback():
    from transformers import TrainerCallback

    class LoadControllerCallback(TrainerCallback):
        """After each optimizer step, every MoE block with a null bias moves it: to where that
        step's tokens would have met the target (``rate`` None: each training forward counts
        the true picks at the probe offsets of ``ops.load_control``), or by rate x (load -
        target). The counts are summed over ranks, so every rank takes the same step
        (megatron_adamoe.mcore's controller, in HF form)."""

        def __init__(self, model, rate) -> None:
            from megatron_adamoe.ops.load_control import probe_offsets_P

            self.blocks = [
                b for b in moe_blocks(model) if getattr(b, "null_bias", None) is not None
            ]
            targets = model.config.router_target_load
            self.targets = targets if isinstance(targets, list) else [targets] * len(self.blocks)
            self.rate = rate
            self.offsets_P = probe_offsets_P()
            self.probe_counts = [None] * len(self.blocks)
            if rate is None:
                for index, block in enumerate(self.blocks):
                    block.register_forward_hook(self._probe_hook(index))

        def _probe_hook(self, index: int):
            from megatron_adamoe.ops.load_control import true_picks_at_offsets

            def hook(block, inputs, output):
                if not (block.training and torch.is_grad_enabled()):
                    return
                logits_TX = output[1].detach()
                counted_T = block.counted_T
                if counted_T is not None and counted_T.numel() == logits_TX.size(0):
                    logits_TX = logits_TX[counted_T]
                picks_P = true_picks_at_offsets(
                    logits_TX,
                    block.topk,
                    block.num_true_experts,
                    self.offsets_P.to(logits_TX.device),
                    block.selection_bias(),
                    block.topp_threshold,
                )
                counts = torch.cat([picks_P, picks_P.new_tensor([float(logits_TX.size(0))])])
                counts = counts.double().cpu()
                previous = self.probe_counts[index]
                self.probe_counts[index] = counts if previous is None else previous + counts

            return hook

        def on_step_end(self, args, state, control, **kwargs):
            if not self.blocks:
                return
            if self.rate is None:
                self._solve_step()
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

        def _solve_step(self) -> None:
            from megatron_adamoe.ops.load_control import null_bias_step

            width = self.offsets_P.numel() + 1
            counts = _all_reduce(
                torch.stack(
                    [
                        c if c is not None else torch.zeros(width, dtype=torch.float64)
                        for c in self.probe_counts
                    ]
                ).to(self.blocks[0].null_bias.device)
            )
            offsets = self.offsets_P.tolist()
            with torch.no_grad():
                for block, row, target in zip(self.blocks, counts, self.targets):
                    tokens = float(row[-1])
                    if tokens > 0:
                        loads = (row[:-1] / tokens).tolist()
                        block.null_bias += null_bias_step(loads, offsets, target)
                    block.step_counts = None
            self.probe_counts = [None] * len(self.blocks)

    return LoadControllerCallback


def make_aux_schedule_callback():
    from transformers import TrainerCallback

    class AuxLossScheduleCallback(TrainerCallback):
        """Before each optimizer step: the load-balancing coefficient of --aux-loss-coef-schedule
        at that step (0-based), on every rank: the AdaMoE model's ``router_aux_loss_coef`` or
        the Mo-LoRA ``aux_loss_coef``."""

        def __init__(self, model, schedule, method: str) -> None:
            self.model, self.schedule, self.method = model, schedule, method

        def on_step_begin(self, args, state, control, **kwargs):
            value = float(self.schedule(state.global_step))
            if self.method == "mo-lora":
                self.model.mo_lora_config.aux_loss_coef = value
            else:
                self.model.config.router_aux_loss_coef = value

    return AuxLossScheduleCallback


def make_stop_callback():
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        """SIGTERM (from the launcher, SLURM, or ``finetune_launch.watch_launchers`` when the
        launcher is gone): the step in progress finishes, every rank learns of it through one
        all-reduce per step (so all stop after the same step), the Trainer saves a checkpoint of
        that step and stops. ``stopped_at``: the step, or None."""

        def __init__(self, signum: int = signal.SIGTERM) -> None:
            self.received, self.stopped_at, self.signum = False, None, signum
            self.previous = signal.signal(signum, self._handle)

        def _handle(self, signum, frame) -> None:
            self.received = True

        def on_step_end(self, args, state, control, **kwargs):
            flag = torch.tensor([int(self.received)], dtype=torch.int32)
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                if torch.distributed.get_backend() == "nccl":
                    flag = flag.cuda()
                flag = _all_reduce(flag, torch.distributed.ReduceOp.MAX)
            if int(flag.item()):
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

        def restore(self) -> None:
            signal.signal(self.signum, self.previous)

    return StopOnSignal
