#!/usr/bin/env python
"""Benchmark the Hugging Face AdaMoE model against the same model as plain top-k, in one run.

Both models hold the same random weights (the top-k twin has the AdaMoE router's true-expert rows
and no null experts); only routing differs. For eager and sdpa attention, at each batch size:
prefill tokens/s (one forward over the prompt) and decode tokens/s (greedy generation with the
dynamic cache, prefill excluded), the AdaMoE model's measured load (true experts per token,
mean over MoE layers) and the ratios AdaMoE / top-k of time and of expert FLOPs. Runs alternate
between the two models, and each figure is a median over --repeats.

    python tools/bench_hf_model.py                 # CPU: 4 layers, hidden 512, 8 experts
    python tools/bench_hf_model.py --device cuda --batch-sizes 1 8 32
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ffn", type=int, default=1024)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--num-null-experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=3, help="AdaMoE k over n + m")
    parser.add_argument("--baseline-topk", type=int, default=2)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (prefill)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decoded tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--attention", nargs="+", default=["eager", "sdpa"])
    parser.add_argument("--seed", type=int, default=1234)
    options = parser.parse_args(argv)
    for name in ("layers", "hidden", "ffn", "num_experts", "prompt", "new_tokens", "repeats"):
        if getattr(options, name) < 1:
            parser.error(f"{name} ({getattr(options, name)}) must be >= 1")
    if options.num_null_experts < 0:
        parser.error(f"num_null_experts ({options.num_null_experts}) must be >= 0")
    if not 1 <= options.baseline_topk <= options.num_experts:
        parser.error(
            f"baseline_topk ({options.baseline_topk}) must be in [1, {options.num_experts}]"
        )
    return options


def build_pair(options, attention: str):
    """(AdaMoE model, its top-k twin): the same weights but the null rows of the router."""
    from megatron_adamoe.hf import AdaMoEForCausalLM, AdaMoEHFConfig

    shape = dict(
        vocab_size=4096,
        hidden_size=options.hidden,
        intermediate_size=options.ffn,
        moe_intermediate_size=options.ffn,
        num_hidden_layers=options.layers,
        num_attention_heads=8,
        num_key_value_heads=8,
        num_local_experts=options.num_experts,
        max_position_embeddings=options.prompt + options.new_tokens,
        attn_implementation=attention,
    )
    torch.manual_seed(options.seed)
    ada = AdaMoEForCausalLM(
        AdaMoEHFConfig(
            **shape, num_null_experts=options.num_null_experts, num_experts_per_tok=options.topk
        )
    )
    topk = AdaMoEForCausalLM(
        AdaMoEHFConfig(**shape, num_null_experts=0, num_experts_per_tok=options.baseline_topk)
    )
    state = {
        name: tensor[: options.num_experts] if name.endswith("gate.weight") else tensor
        for name, tensor in ada.state_dict().items()
    }
    topk.load_state_dict(state, strict=True)
    for model in (ada, topk):
        model.to(options.device).eval()
        model.generation_config.eos_token_id = None
    return ada, topk


def measured_load(model, tokens) -> float:
    with torch.no_grad():
        out = model.model(tokens, use_cache=False, output_router_logits=True)
    blocks = [layer.block_sparse_moe for layer in model.model.layers if layer.is_moe]
    loads = [
        float(block.route(logits).routing_map_TE.sum(-1).float().mean())
        for block, logits in zip(blocks, out.router_logits)
    ]
    return sum(loads) / len(loads)


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_prefill(model, tokens, device) -> float:
    _synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        model(tokens, use_cache=False, logits_to_keep=1)
    _synchronize(device)
    return time.perf_counter() - started


def time_decode(model, tokens, new_tokens, device) -> float:
    """Seconds for ``new_tokens`` greedy steps with the cache, the prefill's time taken off."""
    _synchronize(device)
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(tokens, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    _synchronize(device)
    total = time.perf_counter() - started
    return max(total - time_prefill(model, tokens, device), 1e-9)


def main(argv=None) -> int:
    options = parse_args(argv)
    rows = []
    for attention in options.attention:
        ada, topk = build_pair(options, attention)
        for batch in options.batch_sizes:
            tokens = torch.randint(
                1, 4096, (batch, options.prompt), generator=torch.Generator().manual_seed(batch)
            ).to(options.device)
            load = measured_load(ada, tokens)
            times = {("ada", "prefill"): [], ("topk", "prefill"): []}
            times.update({("ada", "decode"): [], ("topk", "decode"): []})
            for model in (ada, topk):  # warm-up
                time_prefill(model, tokens, options.device)
                time_decode(model, tokens, 2, options.device)
            for _ in range(options.repeats):  # alternating: drift hits both alike
                for name, model in (("ada", ada), ("topk", topk)):
                    times[(name, "prefill")].append(time_prefill(model, tokens, options.device))
                    times[(name, "decode")].append(
                        time_decode(model, tokens, options.new_tokens, options.device)
                    )
            median = {key: statistics.median(values) for key, values in times.items()}
            rows.append(
                {
                    "attention": attention,
                    "batch": batch,
                    "load": load,
                    "prefill_tok_s": {
                        n: batch * options.prompt / median[(n, "prefill")] for n in ("ada", "topk")
                    },
                    "decode_tok_s": {
                        n: batch * options.new_tokens / median[(n, "decode")]
                        for n in ("ada", "topk")
                    },
                    "prefill_ratio": median[("ada", "prefill")] / median[("topk", "prefill")],
                    "decode_ratio": median[("ada", "decode")] / median[("topk", "decode")],
                }
            )
    print(
        f"HF model, {options.layers} layers, hidden {options.hidden}, {options.num_experts} "
        f"experts (FFN {options.ffn}); AdaMoE m = {options.num_null_experts}, k = {options.topk} "
        f"vs top-{options.baseline_topk}; prompt {options.prompt}, {options.new_tokens} decoded "
        f"tokens; median of {options.repeats}; {options.device}, "
        f"{torch.get_num_threads()} threads"
    )
    header = (
        "attention  batch  load  expert FLOPs  prefill tok/s ada/top-k   time ratio  "
        "decode tok/s ada/top-k   time ratio"
    )
    print(header)
    for row in rows:
        prefill, decode = row["prefill_tok_s"], row["decode_tok_s"]
        print(
            f"{row['attention']:<9}  {row['batch']:>5}  {row['load']:.2f}  "
            f"{row['load'] / options.baseline_topk:>12.3f}  "
            f"{prefill['ada']:>10.0f} / {prefill['topk']:<10.0f}  {row['prefill_ratio']:>10.2f}  "
            f"{decode['ada']:>9.0f} / {decode['topk']:<9.0f}  {row['decode_ratio']:>10.2f}"
        )
    print("time ratio = AdaMoE time / top-k time (below 1: AdaMoE faster); expert FLOPs likewise")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
