#!/usr/bin/env python
"""Benchmark an AdaMoE layer against the stock Megatron-Core top-k layer, measured in one run.

Both layers have the same experts (weights copied); only routing differs. Prints, per layer:
forward+backward time, router forward+backward time, measured load (true experts per token), and
the rows the dispatch all-to-all ships under EP = 2 (two gloo ranks), then AdaMoE/stock ratios:
the time ratio stands next to the load ratio it should track.

    python tools/bench_moe_layer.py                     # CPU, small shapes
    python tools/bench_moe_layer.py --device cuda --preset mixtral --te [--fp8-recipe delayed]

On GPU it also times the expert GEMMs alone (TFLOP/s) against a dense GEMM of the same total
size in the same run (tools/_bench_gpu.py).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_adamoe.ops import expected_load
from megatron_adamoe.options.vocab import FP8_RECIPES


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--adamoe-num-null-experts", type=int, default=8)
    parser.add_argument("--moe-router-topk", type=int, default=3, help="AdaMoE k over n + m")
    parser.add_argument("--baseline-topk", type=int, default=2, help="stock top-k baseline")
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--skip-ep", action="store_true", help="skip the EP = 2 all-to-all count")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument(
        "--preset",
        choices=["mixtral"],
        default=None,
        help="Mixtral-8x7B layer: hidden 4096, FFN 14336, 8 experts, seq 4096, bf16",
    )
    parser.add_argument(
        "--te", action="store_true", help="Transformer Engine spec with grouped-GEMM experts (GPU)"
    )
    parser.add_argument(
        "--fp8-recipe",
        default=None,
        choices=FP8_RECIPES,
        help="FP8 (hybrid format) for the expert GEMMs; needs --te",
    )
    args = parser.parse_args(argv)
    if args.preset == "mixtral":
        args.hidden, args.ffn, args.num_experts, args.seq, args.dtype = 4096, 14336, 8, 4096, "bf16"
    for field in ("hidden", "ffn", "num_experts", "seq", "micro_batch", "iters", "baseline_topk"):
        if getattr(args, field) < 1:
            parser.error(f"--{field.replace('_', '-')} ({getattr(args, field)}) must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda (requested) must have CUDA available; use --device cpu")
    if args.te and args.device != "cuda":
        parser.error(
            "--te (requested) must come with --device cuda; Transformer Engine is GPU only"
        )
    if args.fp8_recipe and not args.te:
        parser.error(f"--fp8-recipe ({args.fp8_recipe}) must come with --te; FP8 GEMMs are TE's")
    if args.fp8_recipe and args.dtype != "bf16":
        parser.error(f"--fp8-recipe ({args.fp8_recipe}) must come with --dtype bf16")
    if args.num_experts % 2 and not args.skip_ep:
        parser.error(f"--num-experts ({args.num_experts}) must be even for EP = 2; or --skip-ep")
    return args


def init_process_group(rank, world_size, store_path, device):
    store = dist.FileStore(store_path, world_size)
    backend = "nccl" if device == "cuda" else "gloo"
    dist.init_process_group(
        backend, store=store, rank=rank, world_size=world_size, timeout=timedelta(minutes=10)
    )
    if device == "cpu":
        from megatron_adamoe import enable_cpu_mode

        enable_cpu_mode()
    else:
        torch.cuda.set_device(rank)


def build_layers(args, ep=1):
    """(stock MoELayer with top-k baseline, AdaMoELayer with m nulls), same expert weights."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_adamoe import AdaMoEConfig, get_adamoe_gpt_layer_spec
    from megatron_adamoe.mcore._compat import build_mlp

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    common = dict(
        num_layers=1,
        hidden_size=args.hidden,
        num_attention_heads=max(1, args.hidden // 64),
        num_moe_experts=args.num_experts,
        moe_ffn_hidden_size=args.ffn,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.01,
        expert_model_parallel_size=ep,
        use_cpu_initialization=True,
        add_bias_linear=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        moe_router_dtype="fp32",
        moe_grouped_gemm=args.te,
        **(dict(fp8="hybrid", fp8_recipe=args.fp8_recipe) if args.fp8_recipe else {}),
    )
    stock_config = TransformerConfig(moe_router_topk=args.baseline_topk, **common)
    stock_spec = (
        get_gpt_layer_with_transformer_engine_spec(
            num_experts=args.num_experts, moe_grouped_gemm=True
        )
        if args.te
        else get_gpt_layer_local_spec(num_experts=args.num_experts)
    )
    stock = build_mlp(stock_spec.submodules.mlp, stock_config)
    adamoe_config = AdaMoEConfig(
        moe_router_topk=args.moe_router_topk,
        adamoe_num_null_experts=args.adamoe_num_null_experts,
        **common,
    )
    adamoe_spec = get_adamoe_gpt_layer_spec(
        num_experts=args.num_experts, use_transformer_engine=args.te, moe_grouped_gemm=args.te
    )
    adamoe = build_mlp(adamoe_spec.submodules.mlp, adamoe_config)
    adamoe.experts.load_state_dict(stock.experts.state_dict())
    for layer in (stock, adamoe):
        layer.set_layer_number(1)
        layer.to(args.device)
    return stock, adamoe


def time_alternating(steps, iters, warmup, device):
    """Median ms of each named step; the steps alternate within every iteration so that drift in
    machine load hits all of them alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    samples = {name: [] for name in steps}
    for _ in range(iters):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1e3 for name, times in samples.items()}


def measure(layers, x, args):
    """Per layer: median ms of layer fwd+bwd and router fwd+bwd, and the measured load."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    def layer_step(layer):
        x_step = x.detach().requires_grad_(True)
        with _fp8_context(layer.config, args):
            out, _ = layer(x_step)
        out.float().sum().backward()
        layer.zero_grad(set_to_none=True)
        clear_aux_losses_tracker()

    def router_step(layer):
        probs, _ = layer.router(x)
        probs.float().sum().backward()
        layer.zero_grad(set_to_none=True)
        clear_aux_losses_tracker()

    layer_ms = time_alternating(
        {name: (lambda chosen=layer: layer_step(chosen)) for name, layer in layers.items()},
        args.iters,
        args.warmup,
        args.device,
    )
    router_ms = time_alternating(
        {name: (lambda chosen=layer: router_step(chosen)) for name, layer in layers.items()},
        args.iters,
        args.warmup,
        args.device,
    )
    rows = {}
    for name, layer in layers.items():
        with torch.no_grad():
            _, routing_map = layer.router(x)
        rows[name] = dict(
            layer_ms=layer_ms[name],
            router_ms=router_ms[name],
            load=routing_map.sum().item() / routing_map.shape[0],
        )
    return rows


def _fp8_context(config, args):
    if args.device != "cuda":
        return contextlib.nullcontext()
    from _bench_gpu import fp8_context

    return fp8_context(config)


def ep2_rank(rank, world_size, store_path, args, results):
    """One EP = 2 rank: count the rows each layer's dispatch all-to-all sends."""
    from megatron.core import parallel_state

    init_process_group(rank, world_size, store_path, args.device)
    try:
        parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
        torch.manual_seed(args.seed)
        stock, adamoe = build_layers(args, ep=2)
        x = make_input(args, seed=args.seed + rank)
        original = dist.all_to_all_single
        counts = {}
        for name, layer in (("stock", stock), ("adamoe", adamoe)):
            sent = []

            def recording(output, input, *a, **k):
                sent.append(input.shape[0])
                return original(output, input, *a, **k)

            dist.all_to_all_single = recording
            try:
                with torch.no_grad(), _fp8_context(layer.config, args):
                    layer(x)
            finally:
                dist.all_to_all_single = original
            counts[name] = sent[0]  # the first all-to-all of a forward dispatches the tokens
        results.put((rank, counts))
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def make_input(args, seed):
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    x = torch.randn(args.seq, args.micro_batch, args.hidden, generator=generator)
    return x.to(device=args.device, dtype=dtype)


def all_to_all_rows(args):
    """{'stock': rows, 'adamoe': rows} dispatched by both EP = 2 ranks together."""
    context = mp.get_context("spawn")
    results = context.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        store_path = os.path.join(tmp, "store")
        processes = [
            context.Process(target=ep2_rank, args=(rank, 2, store_path, args, results))
            for rank in range(2)
        ]
        for process in processes:
            process.start()
        per_rank = [results.get(timeout=600) for _ in processes]
        for process in processes:
            process.join()
    return {name: sum(counts[name] for _, counts in per_rank) for name in ("stock", "adamoe")}


def main(argv=None):
    args = parse_args(argv)
    from megatron.core import parallel_state

    with tempfile.TemporaryDirectory() as tmp:
        init_process_group(0, 1, os.path.join(tmp, "store"), args.device)
        parallel_state.initialize_model_parallel()
        torch.manual_seed(args.seed)
        stock, adamoe = build_layers(args)
        x = make_input(args, seed=args.seed)
        print(
            f"measuring fwd+bwd on {args.device} ({torch.get_num_threads()} threads) ...",
            flush=True,
        )
        rows = measure({"stock": stock, "adamoe": adamoe}, x, args)
        gemm = expert_gemm_table({"stock": stock, "adamoe": adamoe}, x, args)
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
    if not args.skip_ep:
        print("counting all-to-all rows under EP = 2 (2 ranks) ...", flush=True)
        for name, count in all_to_all_rows(args).items():
            rows[name]["a2a_rows"] = count
    print_table(args, rows)
    if gemm:
        print_gemm_table(gemm)


def expert_gemm_table(layers, x, args):
    """GPU only: expert GEMM TFLOP/s of both layers and of a dense GEMM of AdaMoE's row count."""
    if args.device != "cuda":
        return None
    from _bench_gpu import dense_gemm, expert_gemm

    table = {name: expert_gemm(layer, x, args) for name, layer in layers.items()}
    table["dense"] = dense_gemm(table["adamoe"]["rows"], layers["adamoe"].config, args)
    return table


def print_gemm_table(table):
    print(
        f"\n{'expert GEMMs (fwd+bwd)':<26}{'rows':>9}{'FP8 pad':>9}{'ms':>10}{'TFLOP/s':>10}"
        f"{'vs dense':>10}"
    )
    for name, label in (
        ("stock", "stock experts"),
        ("adamoe", "AdaMoE experts"),
        ("dense", "dense GEMM, same rows"),
    ):
        r = table[name]
        ratio = r["tflops"] / table["dense"]["tflops"]
        print(
            f"{label:<26}{r['rows']:>9d}{r['pad_rows']:>9d}{r['ms']:>10.2f}"
            f"{r['tflops']:>10.1f}{ratio:>10.3f}"
        )


def print_table(args, rows):
    tokens = args.seq * args.micro_batch
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    precision = f"fp8 {args.fp8_recipe}" if args.fp8_recipe else args.dtype
    experts = "TE grouped GEMM" if args.te else "local experts"
    print(
        f"\ndevice {device} | {precision} | {experts} | tokens {tokens} | hidden {args.hidden} "
        f"ffn {args.ffn} | experts {args.num_experts} true + {args.adamoe_num_null_experts} null"
    )
    labels = {
        "stock": f"stock top-{args.baseline_topk}",
        "adamoe": f"AdaMoE m={args.adamoe_num_null_experts} k={args.moe_router_topk}",
    }
    header = f"{'layer':<22}{'load':>8}{'fwd+bwd ms':>13}{'router ms':>12}{'a2a rows EP2':>15}"
    print(header)
    print("-" * len(header))
    for name in ("stock", "adamoe"):
        r = rows[name]
        a2a = f"{r['a2a_rows']:>15d}" if "a2a_rows" in r else f"{'-':>15}"
        print(
            f"{labels[name]:<22}{r['load']:>8.3f}{r['layer_ms']:>13.2f}{r['router_ms']:>12.2f}{a2a}"
        )
    s, a = rows["stock"], rows["adamoe"]
    a2a_ratio = f"{a['a2a_rows'] / s['a2a_rows']:>15.3f}" if "a2a_rows" in a else f"{'-':>15}"
    print(
        f"{'ratio AdaMoE/stock':<22}{a['load'] / s['load']:>8.3f}"
        f"{a['layer_ms'] / s['layer_ms']:>13.3f}{a['router_ms'] / s['router_ms']:>12.3f}{a2a_ratio}"
    )
    balanced = expected_load(args.moe_router_topk, args.num_experts, args.adamoe_num_null_experts)
    print(
        f"\nload ratio {a['load'] / s['load']:.3f} vs fwd+bwd time ratio "
        f"{a['layer_ms'] / s['layer_ms']:.3f} (expert FLOPs scale with load; "
        f"AdaMoE load at perfect balance k*n/(n+m) = {balanced:.3f})"
    )


if __name__ == "__main__":
    main()
