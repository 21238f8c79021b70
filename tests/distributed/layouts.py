"""Rank functions for the parallel-layout tests (run through tests.spawn.run_distributed).

A case is a dict of sizes and AdaMoE settings. Its tokens form one global batch [seq, batch,
hidden]; each attention data-parallel rank takes a slice of the batch, and under sequence
parallelism each tensor-parallel rank a slice of the sequence. The single-process reference runs
the same layer once per data-parallel shard and sums the gradients, which is exactly what data
parallelism computes (the aux loss is per micro-batch and per TP/CP group, as in Megatron).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from tests.builders import adamoe_config, build_adamoe_layer
from tests.reference import (
    dense_adamoe_layer,
    expected_expert_grads,
    load_full_weights,
    local_expert_grads,
    make_full_weights,
)

TOL = dict(rtol=1e-4, atol=1e-5)


def case_config(case, **parallel):
    return adamoe_config(
        hidden_size=case["hidden"],
        moe_ffn_hidden_size=case["ffn"],
        num_moe_experts=case["num_true"],
        adamoe_num_null_experts=case["num_null"],
        moe_router_topk=case["topk"],
        adamoe_null_expert_type=case["null_type"],
        adamoe_weight_norm=case["weight_norm"],
        moe_aux_loss_coeff=case["aux_coeff"],
        gated_linear_unit=case["glu"],
        **parallel,
    )


def case_tensors(case):
    """(weights, x [S, B, H], grad_out [S, B, H]); starved experts are never selected."""
    weights = make_full_weights(
        case["seed"], case["hidden"], case["ffn"], case["num_true"], case["num_null"], case["glu"]
    )
    generator = torch.Generator().manual_seed(case["seed"] + 1)
    shape = (case["seq"], case["batch"], case["hidden"])
    x, grad_out = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    if case.get("starved_experts"):
        x[..., 0] = x[..., 0].abs() + 3.0
        weights.router[case["starved_experts"], 0] = -100.0
    if case.get("all_null_first_half"):
        # Tokens of the first half of the batch pick only nulls; the rest never pick a null.
        half = case["batch"] // 2
        x[:, :half, 0], x[:, half:, 0] = 3.0, -3.0
        weights.router[case["num_true"] :, 0] = 100.0
    return weights, x, grad_out


def reference_worker(rank, world_size, case, shard_counts):
    """World of one: the layer on each data-parallel shard in turn, gradients accumulated."""
    parallel_state.initialize_model_parallel(1, 1)
    weights, x, grad_out = case_tensors(case)
    references = {}
    for num_shards in shard_counts:
        layer = build_adamoe_layer(case_config(case))
        load_full_weights(layer, weights, glu=case["glu"])
        outputs, input_grads = [], []
        for x_shard, grad_shard in zip(x.chunk(num_shards, 1), grad_out.chunk(num_shards, 1)):
            x_shard = x_shard.clone().requires_grad_(True)
            out, _ = layer(x_shard)
            (out * grad_shard).sum().backward()
            outputs.append(out.detach())
            input_grads.append(x_shard.grad)
        grads = local_expert_grads(layer)
        references[num_shards] = dict(
            out=torch.cat(outputs, 1),
            x_grad=torch.cat(input_grads, 1),
            router_grad=layer.router.weight.grad.clone(),
            fc1_grad=torch.stack([fc1 for _, fc1, _ in grads]),
            fc2_grad=torch.stack([fc2 for _, _, fc2 in grads]),
        )
    return references


@contextlib.contextmanager
def recorded_all_to_all(record: list):
    """Record (rows sent, rows received) of every all_to_all_single issued inside the block."""
    original = dist.all_to_all_single

    def recording(output, input, *args, **kwargs):
        record.append((input.shape[0], output.shape[0]))
        return original(output, input, *args, **kwargs)

    dist.all_to_all_single = recording
    try:
        yield record
    finally:
        dist.all_to_all_single = original


def parallel_worker(rank, world_size, case, layouts, references):
    """Run each layout on this world and compare with the single-process reference."""
    weights, x, grad_out = case_tensors(case)
    report = {}
    for name, layout in layouts.items():
        tp, ep, etp = layout.get("tp", 1), layout.get("ep", 1), layout.get("etp")
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
        )
        try:
            report[name] = _run_layout(case, layout, weights, x, grad_out, references, name)
        finally:
            parallel_state.destroy_model_parallel()
    return report


def _run_layout(case, layout, weights, x, grad_out, references, name):
    tp, ep, etp = layout.get("tp", 1), layout.get("ep", 1), layout.get("etp")
    config = case_config(
        case,
        tensor_model_parallel_size=tp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        sequence_parallel=tp > 1,
        moe_token_dispatcher_type=layout.get("dispatcher", "alltoall"),
    )
    layer = build_adamoe_layer(config)
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    etp_size = parallel_state.get_expert_tensor_parallel_world_size()
    load_full_weights(layer, weights, etp_rank, etp_size, glu=case["glu"])

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    batch = slice(dp_rank * x.shape[1] // dp_size, (dp_rank + 1) * x.shape[1] // dp_size)
    seq = slice(tp_rank * x.shape[0] // tp, (tp_rank + 1) * x.shape[0] // tp)
    x_local = x[seq, batch].clone().requires_grad_(True)

    with recorded_all_to_all([]) as sent:
        out, _ = layer(x_local)
    (out * grad_out[seq, batch]).sum().backward()

    ref = references[dp_size]
    check = lambda got, want, what: torch.testing.assert_close(  # noqa: E731
        got, want, **TOL, msg=lambda m: f"{name}: {what}: {m}"
    )
    check(out.detach(), ref["out"][seq, batch], "output")
    check(x_local.grad, ref["x_grad"][seq, batch], "input grad")
    router_grad = layer.router.weight.grad.clone()
    dist.all_reduce(router_grad)  # what DDP + the sequence-parallel grad all-reduce do
    check(router_grad, ref["router_grad"], "router grad")
    expert_dp_group = parallel_state.get_expert_data_parallel_group()
    for expert, fc1_grad, fc2_grad in local_expert_grads(layer):
        fc1_grad, fc2_grad = fc1_grad.clone(), fc2_grad.clone()
        dist.all_reduce(fc1_grad, group=expert_dp_group)
        dist.all_reduce(fc2_grad, group=expert_dp_group)
        want_fc1, want_fc2 = expected_expert_grads(
            ref["fc1_grad"], ref["fc2_grad"], expert, etp_rank, etp_size, case["glu"]
        )
        check(fc1_grad, want_fc1, f"expert {expert} fc1 grad")
        check(fc2_grad, want_fc2, f"expert {expert} fc2 grad")

    # Independent count of this rank's true assignments: the dense reference's own top-k.
    tokens = x[seq, batch].reshape(-1, x.shape[-1])
    with torch.no_grad():
        _, selections = dense_adamoe_layer(
            tokens, weights, case["topk"], case["weight_norm"], case["null_type"], case["glu"]
        )
    return dict(
        all_to_all_rows=sent,
        true_assignments=sum(len(true_picks) for true_picks, _ in selections),
        num_tokens=tokens.shape[0],
        local_experts=list(layer.local_expert_indices),
    )


def padded_load_metric_worker(rank, world_size, case):
    """TP = 2 with sequence parallel and uneven padding: the tracker's load is the mean over the
    valid tokens of the whole group. Returns (logged load, dense-reference load)."""
    from megatron_adamoe.mcore._compat import clear_moe_tracker, moe_tracker

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    layer = build_adamoe_layer(
        case_config(case, tensor_model_parallel_size=2, sequence_parallel=True)
    )
    weights, x, _ = case_tensors(case)
    etp_rank = parallel_state.get_expert_tensor_parallel_rank()
    load_full_weights(layer, weights, etp_rank, 2, glu=case["glu"])
    seq_len = x.shape[0]
    padded_BS = torch.zeros(x.shape[1], seq_len, dtype=torch.bool)  # True = padding
    padded_BS[:, 1 : seq_len // 2] = True  # rank 0 keeps one position per sequence, rank 1 all
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    seq = slice(tp_rank * seq_len // 2, (tp_rank + 1) * seq_len // 2)
    clear_moe_tracker()
    layer(x[seq].clone().requires_grad_(True), padding_mask=padded_BS[:, seq])
    logged = moe_tracker()["adamoe/load"]["values"][0].clone()
    dist.all_reduce(logged, group=parallel_state.get_tensor_model_parallel_group())

    valid_tokens = x.transpose(0, 1)[~padded_BS]
    with torch.no_grad():
        _, selections = dense_adamoe_layer(
            valid_tokens, weights, case["topk"], case["weight_norm"], case["null_type"], case["glu"]
        )
    expected = sum(len(true_picks) for true_picks, _ in selections) / len(selections)
    return logged.item(), expected
