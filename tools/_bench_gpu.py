"""GPU-only parts of tools/bench_moe_layer.py: FP8 context and expert GEMM TFLOP/s against a
dense GEMM of the same total size, measured in the same run. Imported only with --device cuda."""

from __future__ import annotations

import contextlib

import torch

from megatron_adamoe.ops.fp8 import fp8_align_size, local_padding_rows


def fp8_context(config):
    """Megatron's FP8 autocast for ``config`` (a no-op without ``config.fp8``)."""
    if not getattr(config, "fp8", None):
        return contextlib.nullcontext()
    from megatron.core.fp8_utils import get_fp8_context

    return get_fp8_context(config)


def _time_ms(step, iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def swiglu_flops(rows: int, hidden: int, ffn: int) -> float:
    """fwd + bwd FLOPs of fc1 [hidden -> 2 ffn] and fc2 [ffn -> hidden] on ``rows`` rows."""
    forward = 2 * rows * hidden * 2 * ffn + 2 * rows * ffn * hidden
    return 3 * forward


def expert_gemm(layer, x, args) -> dict:
    """Rows, fwd+bwd ms and TFLOP/s of ``layer.experts`` alone, on the inputs the layer's own
    dispatcher gives them for ``x`` (captured by a forward pre-hook)."""
    captured = {}

    def capture(module, inputs):
        captured["inputs"] = [t.detach() for t in inputs]

    handle = layer.experts.register_forward_pre_hook(capture)
    with torch.no_grad(), fp8_context(layer.config):
        layer(x)
    handle.remove()
    hidden_states, tokens_per_expert, probs = captured["inputs"]

    def step():
        inputs = hidden_states.clone().requires_grad_(True)
        with fp8_context(layer.config):
            out, _ = layer.experts(inputs, tokens_per_expert, probs)
        out.float().sum().backward()
        layer.zero_grad(set_to_none=True)

    ms = _time_ms(step, args.iters, args.warmup)
    rows = int(tokens_per_expert.sum())
    # FP8: TEGroupedMLP pads each expert's rows to the recipe's alignment, after the all-to-all
    pad_rows = (
        local_padding_rows(tokens_per_expert.cpu(), fp8_align_size(args.fp8_recipe))
        if args.fp8_recipe
        else 0
    )
    return dict(
        rows=rows,
        pad_rows=pad_rows,
        ms=ms,
        tflops=swiglu_flops(rows, args.hidden, args.ffn) / ms / 1e9,
    )


def dense_gemm(rows: int, config, args) -> dict:
    """The same SwiGLU GEMMs on all ``rows`` at once (one expert), TE Linear layers, same
    dtype and FP8 recipe: the throughput the grouped expert GEMMs are compared with."""
    import transformer_engine.pytorch as te

    dtype = torch.bfloat16
    fc1 = te.Linear(args.hidden, 2 * args.ffn, bias=False, params_dtype=dtype).cuda()
    fc2 = te.Linear(args.ffn, args.hidden, bias=False, params_dtype=dtype).cuda()
    x = torch.randn(max(rows, 16) // 16 * 16, args.hidden, device="cuda", dtype=dtype)

    def step():
        inputs = x.clone().requires_grad_(True)
        with fp8_context(config):
            gate, up = fc1(inputs).chunk(2, dim=-1)
            out = fc2(torch.nn.functional.silu(gate) * up)
        out.float().sum().backward()
        fc1.zero_grad(set_to_none=True)
        fc2.zero_grad(set_to_none=True)

    ms = _time_ms(step, args.iters, args.warmup)
    return dict(
        rows=x.shape[0],
        pad_rows=0,
        ms=ms,
        tflops=swiglu_flops(x.shape[0], args.hidden, args.ffn) / ms / 1e9,
    )
