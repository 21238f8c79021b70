"""The target-load controller: after every global batch, each MoE layer's null bias moves to
where that batch's load would have been the target (``ops.load_control``: the true picks counted
at a ladder of probe offsets of the bias); with ``adamoe_load_controller_rate`` set (an expert
override) it moves by rate x (measured load - target load) instead.

The load is counted over every token of the global batch: each router accumulates its rank's
[true assignments, tokens] (``local_load_counts``) over the micro-batches, and the counts are
summed over the tensor x data x context parallel group, the group Megatron reduces its expert-bias
token counts over (``get_updated_expert_bias``). Every rank holding a layer (all ranks of its
pipeline stage) therefore computes the same load and the same bias. The update runs where
Megatron updates the expert bias: in ``finalize_model_grads``, after the last micro-batch and
before the optimizer step; ``finalize_model_grads_with_load_control`` is that function plus this
update, to be set as ``config.finalize_model_grads_func``.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.distributed import finalize_model_grads

from megatron_adamoe.mcore.training_state import adamoe_routers
from megatron_adamoe.ops.load_control import null_bias_step


def update_null_biases(model) -> None:
    """One controller step for every load-controlled router of ``model`` (a module or chunks)."""
    routers = [router for router in adamoe_routers(model) if router.load_controlled]
    if not routers:
        return
    group = parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    with torch.no_grad():
        counts_L = torch.stack([router.local_load_counts for router in routers])
        torch.distributed.all_reduce(counts_L, group=group)
        for router, counts in zip(routers, counts_L):
            tokens = float(counts[-1])
            if tokens > 0:  # no training tokens went through (nothing measured): no step
                router.null_bias += _step(router, (counts[:-1] / tokens).tolist())
            router.local_load_counts.zero_()
        check_null_biases_agree(routers, group)


def _step(router, loads_P: list[float]) -> float:
    """The null bias's move from the global batch's loads at the router's probe offsets."""
    target, rate = router.current_target_load(), router.config.adamoe_load_controller_rate
    if rate is not None:  # the fixed-rate rule (one probe: the routing as it was)
        return rate * (loads_P[0] - target)
    return null_bias_step(loads_P, router.load_probe_offsets.tolist(), target)


def check_null_biases_agree(routers, group) -> None:
    """Every rank of the group holds the same null biases (an invariant: two small all-reduces)."""
    biases = torch.cat([router.null_bias for router in routers])
    low, high = biases.clone(), biases.clone()
    torch.distributed.all_reduce(low, op=torch.distributed.ReduceOp.MIN, group=group)
    torch.distributed.all_reduce(high, op=torch.distributed.ReduceOp.MAX, group=group)
    if not torch.equal(low, high):
        raise RuntimeError(
            f"null biases differ across the ranks of a pipeline stage (min "
            f"{low.tolist()}, max {high.tolist()}): the load counts were not "
            "reduced over the whole tensor x data x context parallel group"
        )


def finalize_model_grads_with_load_control(model, *args, **kwargs):
    """Mirrors megatron.core.distributed.finalize_model_grads (gradient all-reduces, the expert
    bias update), then updates the null biases."""
    finalize_model_grads(model, *args, **kwargs)
    update_null_biases(model)
