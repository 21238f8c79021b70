"""What the training loop reports: Megatron-style iteration lines, TensorBoard scalars, FLOPs.

MoE metrics go through Megatron's own ``track_moe_metrics`` (it reduces the tracker across ranks
and writes ``<name>`` and ``moe/<name>_layer_<i>`` scalars). ``RecordingWriter`` forwards those
scalars to TensorBoard (when enabled) and keeps them, so the iteration line can show the
per-layer load without a second reduction.
"""

from __future__ import annotations

import datetime
import logging
import re
from typing import Optional

from megatron_adamoe.options import PretrainArguments

logger = logging.getLogger(__name__)

_LAYER_SCALAR = re.compile(r"^moe/(?P<name>.+)_layer_(?P<layer>\d+)$")


class RecordingWriter:
    """A SummaryWriter stand-in that remembers the last value of every scalar it is given."""

    def __init__(self, writer=None) -> None:
        self.writer = writer
        self.scalars: dict[str, float] = {}

    def add_scalar(self, name: str, value, step: int) -> None:
        value = float(value)
        self.scalars[name] = value
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def per_layer(self, name: str) -> dict[int, float]:
        """{0-based layer index: value} of ``moe/<name>_layer_<i>`` scalars."""
        found = {}
        for key, value in self.scalars.items():
            match = _LAYER_SCALAR.match(key)
            if match and match["name"] == name:
                found[int(match["layer"])] = value
        return found

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_tensorboard(directory: Optional[str]):
    if directory is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=directory, max_queue=100)


def forward_flops_per_token(
    args: PretrainArguments, vocab_size: int, loads: list[float], num_router_outputs: int
) -> float:
    """Forward FLOPs per token (2 per multiply-add) with the given true experts per token in each
    MoE layer. Attention counts the full (non-causal) score matrix, as Megatron's estimate does."""
    hidden = args.hidden_size
    heads = args.num_attention_heads
    groups = args.num_query_groups or heads
    kv_dim = hidden // heads * groups
    gate = 3 if args.swiglu else 2
    ffn = args.ffn_hidden_size or 4 * hidden
    moe_ffn = args.moe_ffn_hidden_size or ffn
    attention = 2 * hidden * (hidden + 2 * kv_dim) + 2 * hidden * hidden
    attention += 2 * 2 * args.seq_length * hidden
    moe_layers = set(args.moe_layer_indices())
    loads_by_layer = dict(zip(sorted(moe_layers), loads))
    total = 2 * hidden * vocab_size
    for layer in range(args.num_layers):
        total += attention
        if layer in moe_layers:
            total += 2 * hidden * num_router_outputs
            total += loads_by_layer[layer] * gate * 2 * hidden * moe_ffn
        else:
            total += gate * 2 * hidden * ffn
    return float(total)


def flops_ratio_vs_topk(args: PretrainArguments, vocab_size: int, loads: list[float]) -> float:
    """Model FLOPs at the measured per-layer loads over those of a top-k baseline (same experts,
    router over the true experts only, k = ``adamoe_flops_baseline_topk``)."""
    baseline_k = args.adamoe_flops_baseline_topk or args.moe_router_topk
    num_moe = len(args.moe_layer_indices())
    measured = forward_flops_per_token(
        args, vocab_size, loads, args.num_experts + args.adamoe_num_null_experts
    )
    baseline = forward_flops_per_token(args, vocab_size, [baseline_k] * num_moe, args.num_experts)
    return measured / baseline


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def iteration_line(
    args: PretrainArguments,
    iteration: int,
    consumed_samples: int,
    seconds_per_iteration: float,
    lr: float,
    losses: dict[str, float],
    grad_norm: Optional[float],
    elapsed: float,
    loads: dict[int, float],
    flops_ratio: Optional[float],
) -> str:
    """One Megatron-style log line (plus AdaMoE's load and FLOPs)."""
    tokens_per_second = args.global_batch_size * args.seq_length / max(seconds_per_iteration, 1e-9)
    remaining = (args.train_iters - iteration) * seconds_per_iteration
    parts = [
        f" [{datetime.datetime.now():%Y-%m-%d %H:%M:%S}] "
        f"iteration {iteration:8d}/{args.train_iters:8d}",
        f"consumed samples: {consumed_samples:12d}",
        f"elapsed time per iteration (ms): {seconds_per_iteration * 1000:.1f}",
        f"learning rate: {lr:.6E}",
        f"global batch size: {args.global_batch_size:5d}",
    ]
    parts += [f"{name}: {value:.6E}" for name, value in losses.items()]
    if grad_norm is not None:
        parts.append(f"grad norm: {grad_norm:.3f}")
    parts.append(f"tokens/s: {tokens_per_second:.0f}")
    parts.append(f"elapsed: {format_duration(elapsed)} ETA: {format_duration(remaining)}")
    if loads:
        mean = sum(loads.values()) / len(loads)
        per_layer = " ".join(f"{loads[i]:.2f}" for i in sorted(loads))
        parts.append(f"load: {mean:.3f} [{per_layer}]")
    if flops_ratio is not None:
        baseline_k = args.adamoe_flops_baseline_topk or args.moe_router_topk
        parts.append(f"FLOPs vs top-{baseline_k}: {flops_ratio:.3f}")
    return " | ".join(parts) + " |"
