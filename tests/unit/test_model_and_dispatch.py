"""GPTModel built from the AdaMoE specs, per-layer metrics, and the dispatcher's exact sizing."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_adamoe import (
    AdaMoELayer,
    AdaMoERouter,
    adamoe_metric_names,
    collect_routing_stats,
    get_adamoe_gpt_decoder_block_spec,
    get_adamoe_gpt_layer_spec,
    set_adamoe_training_step,
)
from megatron_adamoe.mcore._compat import (
    ARGSORT_PERMUTE,
    moe_submodules,
    moe_tracker,
    report_moe_metrics,
)
from megatron_adamoe.mcore.router import LOAD_METRICS, k_eff_metric_names
from tests.builders import adamoe_config, build_adamoe_layer

VOCAB, SEQ, BATCH = 64, 8, 2


def tiny_gpt(config, spec):
    return GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=VOCAB,
        max_sequence_length=SEQ,
        position_embedding_type="rope",
    )


def lm_loss(model):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    positions = torch.arange(SEQ).expand(BATCH, -1)
    causal = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    labels = torch.roll(tokens, -1, dims=1)
    return model(tokens, positions, causal, labels=labels).float().mean()


def test_gpt_model_with_adamoe_layer_spec_trains(megatron_env):
    config = adamoe_config(num_layers=2, adamoe_aux_loss_coeff_schedule="piecewise:0.1,5:0.0")
    model = tiny_gpt(config, get_adamoe_gpt_layer_spec(num_experts=config.num_moe_experts))
    layers = model.decoder.layers
    assert all(isinstance(layer.mlp, AdaMoELayer) for layer in layers)
    assert all(layer.mlp.router.weight.shape == (8, config.hidden_size) for layer in layers)
    lm_loss(model).backward()
    assert all(layer.mlp.router.weight.grad is not None for layer in layers)

    stats = collect_routing_stats(model)
    assert sorted(stats) == [1, 2]
    tracker = moe_tracker()
    for name in LOAD_METRICS + k_eff_metric_names(config.moe_router_topk):
        assert name in tracker, name
    for layer_number, layer_stats in stats.items():
        assert tracker["adamoe/load"]["values"][layer_number - 1].item() == (
            layer_stats.load.item()
        )
        histogram = [tracker[n]["values"][layer_number - 1].item() for n in k_eff_metric_names(3)]
        assert sum(histogram) == pytest.approx(1.0)
    assert tracker["load_balancing_loss"]["values"].gt(0).all()

    # Megatron's own reduction and logging of the tracked names: means over the AdaMoE layers.
    logged = {}
    report_moe_metrics(
        loss_scale=1.0,
        iteration=0,
        total_loss_dict=logged,
        track_names=list(adamoe_metric_names(config)),
        num_layers=config.num_layers,
    )
    mean_load = sum(s.load.item() for s in stats.values()) / len(stats)
    assert logged["adamoe/load"].item() == pytest.approx(mean_load)

    # From step 5 the schedule's coefficient is 0: the loss is still logged (measured), but it
    # no longer reaches the gradient.
    set_adamoe_training_step(model, 5)
    assert layers[0].mlp.router.current_aux_loss_coeff() == 0.0
    model.zero_grad()
    lm_loss(model).backward()
    assert tracker["load_balancing_loss"]["values"].gt(0).all()
    assert set(adamoe_metric_names(config)) == set(tracker)
    null_rows = torch.stack([layer.mlp.router.weight.grad[4:] for layer in layers])
    assert not null_rows.any()  # zero nulls + true_experts: only the aux loss reaches null rows


def test_decoder_block_spec_mixes_dense_and_adamoe_layers(megatron_env):
    config = adamoe_config(num_layers=4, moe_layer_freq=[1, 0, 0, 1])
    model = tiny_gpt(config, get_adamoe_gpt_decoder_block_spec(config))
    kinds = [type(layer.mlp).__name__ for layer in model.decoder.layers]
    assert kinds == ["AdaMoELayer", "MLP", "MLP", "AdaMoELayer"]
    lm_loss(model).backward()
    assert sorted(collect_routing_stats(model)) == [1, 4]


def test_eval_mode_routes_without_aux_loss_or_tracker(megatron_env):
    layer = build_adamoe_layer(adamoe_config(moe_aux_loss_coeff=0.1))
    layer.eval()
    with torch.no_grad():
        layer(torch.randn(4, 2, layer.config.hidden_size))
    assert moe_tracker() == {}
    assert layer.router.last_routing_stats.num_tokens.item() == 8


def argsort_permute(tokens, routing_map, probs=None, num_out_tokens=None, fused=False, **_):
    """Permutation that trusts ``num_out_tokens``, as Megatron-Core 0.17's unfused argsort permute
    and TE's fused permute do: the first ``num_out_tokens`` (expert, token) slots in expert-major
    order, selected slots first. A size larger than the true count takes unselected slots."""
    num_tokens, num_experts = routing_map.shape
    mask_flat = routing_map.T.contiguous().view(-1)
    order = torch.argsort(mask_flat.to(torch.int8), descending=True, stable=True)
    order = order[: int(num_out_tokens)]
    sorted_indices = order % num_tokens
    permuted_probs = None if probs is None else probs.T.contiguous().view(-1)[order]
    return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices


def test_alltoall_dispatcher_is_sized_by_the_routing_map(megatron_env, monkeypatch):
    from megatron.core.transformer.moe import token_dispatcher as upstream
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    layer = build_adamoe_layer(adamoe_config(moe_aux_loss_coeff=0.0))
    x = torch.randn(6, 2, layer.config.hidden_size)
    with torch.no_grad():
        reference, _ = layer(x)
        probs, routing_map = layer.router(x)
        layer.token_dispatcher.dispatch_preprocess(x, routing_map, probs)
    num_true = int(routing_map.sum())
    assert num_true < 12 * layer.config.moe_router_topk  # some picks were null
    assert int(layer.token_dispatcher.num_out_tokens) == num_true
    assert layer.token_dispatcher.cuda_sync_point == "before_permutation_1"

    # A permute that allocates num_out_tokens rows (upstream's own from megatron-core 0.17, a
    # stand-in written here on 0.16) gives the same output with exact sizing...
    if ARGSORT_PERMUTE:
        with pytest.raises(AssertionError, match="argsort-based permute"):
            upstream.permute(x.view(-1, x.size(-1)), routing_map, num_out_tokens=None)
    else:
        monkeypatch.setattr(upstream, "permute", argsort_permute)
    with torch.no_grad():
        out, _ = layer(x)
    torch.testing.assert_close(out, reference)
    # ...and phantom rows with upstream's tokens * k: the expert split no longer adds up.
    layer.token_dispatcher = MoEAlltoAllTokenDispatcher(
        layer.num_local_experts,
        layer.local_expert_indices,
        config=layer.config,
        pg_collection=get_default_pg_collection(),
    )
    with pytest.raises(RuntimeError, match="split"), torch.no_grad():
        layer(x)


def test_router_is_pluggable_into_stock_moe_submodules(megatron_env):
    spec = get_adamoe_gpt_layer_spec(num_experts=4)
    assert moe_submodules(spec.submodules.mlp).router is AdaMoERouter


def test_deepep_manager_masks_null_slots_where_upstream_dispatches_them():
    """Metadata only (DeepEP itself needs GPUs): the manager is built without its __init__."""
    from megatron.core.transformer.moe.token_dispatcher import _DeepepManager

    from megatron_adamoe.mcore.token_dispatcher import AdaMoEDeepepManager

    routing = null_expert_routing_example()
    slots = {}
    for cls in (_DeepepManager, AdaMoEDeepepManager):
        manager = object.__new__(cls)
        manager.num_experts, manager.router_topk, manager.capacity_factor = 4, 3, None
        manager.setup_metadata(routing["routing_map"], routing["probs"])
        slots[cls] = manager.token_indices
    dispatched = lambda indices: int((indices >= 0).sum())  # noqa: E731
    assert dispatched(slots[AdaMoEDeepepManager]) == int(routing["routing_map"].sum()) == 3
    assert dispatched(slots[_DeepepManager]) == 9  # upstream ships k slots for every token
    for token, row in enumerate(slots[AdaMoEDeepepManager].tolist()):
        selected = set(routing["routing_map"][token].nonzero().flatten().tolist())
        assert {i for i in row if i >= 0} == selected


def null_expert_routing_example():
    # k = 3 over 4 true + nulls: token 0 picked experts 0 and 2, token 1 expert 3, token 2 none.
    routing_map = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]], dtype=torch.bool)
    probs = torch.tensor([[0.7, 0.0, 0.3, 0.0], [0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    return dict(routing_map=routing_map, probs=probs)


def test_moe_layers_save_the_pre_mlp_norm_under_transformer_engines_key(megatron_env):
    """Upstream's local spec saves ``pre_mlp_layernorm`` as TE's fused
    ``mlp.linear_fc1.layer_norm_weight`` even in MoE layers, where TE's spec keeps a separate
    ``pre_mlp_layernorm``; AdaMoE's specs save MoE layers under TE's key, dense ones unchanged,
    so checkpoints move between CPU (local) and GPU (TE) runs."""
    from megatron.core.models.gpt import GPTModel

    from megatron_adamoe import get_adamoe_gpt_decoder_block_spec
    from tests.builders import adamoe_config

    config = adamoe_config(num_layers=2, moe_layer_freq=[1, 0], ffn_hidden_size=16)
    model = GPTModel(
        config=config,
        vocab_size=32,
        max_sequence_length=8,
        transformer_layer_spec=get_adamoe_gpt_decoder_block_spec(config),
    )
    keys = {item.key for item in model.sharded_state_dict().values()}  # checkpoint keys
    assert "decoder.layers.0.pre_mlp_layernorm.weight" in keys  # MoE layer: TE's name
    assert "decoder.layers.1.mlp.linear_fc1.layer_norm_weight" in keys  # dense: fused name
    assert "decoder.layers.0.mlp.linear_fc1.layer_norm_weight" not in keys
