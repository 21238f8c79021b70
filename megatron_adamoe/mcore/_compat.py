"""The supported megatron-core versions, checked once when megatron_adamoe.mcore is imported."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED_MEGATRON_CORE = ("0.16.1", "0.20.0")  # [min, max): tested 0.16.1 and 0.19.2


def _as_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def check_megatron_core_version() -> str:
    try:
        installed = version("megatron-core")
    except PackageNotFoundError:
        raise ImportError(
            "megatron_adamoe needs megatron-core >=%s,<%s; install it with "
            "`pip install 'megatron-core>=0.16.1,<0.20'` (0.17+ need Python 3.12)"
            % SUPPORTED_MEGATRON_CORE
        ) from None
    low, high = SUPPORTED_MEGATRON_CORE
    if not _as_tuple(low) <= _as_tuple(installed) < _as_tuple(high):
        raise ImportError(
            f"megatron_adamoe supports megatron-core >={low},<{high}, found {installed}; "
            "install megatron-core 0.16.1 (Python 3.11) or 0.19.x (Python 3.12)"
        )
    return installed


MEGATRON_CORE_VERSION = check_megatron_core_version()


# --- Layer specs. megatron-core 0.16 describes a MoE MLP as ModuleSpec(module=MoELayer,
# submodules=MoESubmodules(...)); from 0.17 (the "MlpBuilder" refactor of
# models/gpt/moe_module_specs.py) it is functools.partial(MoELayer, submodules=MoESubmodules(...)),
# called by TransformerLayer with config, pg_collection, is_mtp_layer and name.


def moe_module_class(mlp_spec):
    """The module class a TransformerLayer's ``mlp`` spec builds (ModuleSpec or partial), or
    None for anything else."""
    import functools

    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp_spec, ModuleSpec):
        return mlp_spec.module
    if isinstance(mlp_spec, functools.partial):
        return mlp_spec.func
    return None


def replace_moe_module(mlp_spec, module_class: type, submodules):
    """``mlp_spec`` (either form) building ``module_class`` with ``submodules`` instead."""
    import dataclasses
    import functools

    from megatron.core.transformer.spec_utils import ModuleSpec

    if isinstance(mlp_spec, ModuleSpec):
        return dataclasses.replace(mlp_spec, module=module_class, submodules=submodules)
    return functools.partial(
        module_class, *mlp_spec.args, **{**mlp_spec.keywords, "submodules": submodules}
    )


def moe_submodules(mlp_spec):
    """The MoESubmodules of a MoE ``mlp`` spec (either form)."""
    import functools

    if isinstance(mlp_spec, functools.partial):
        return mlp_spec.keywords["submodules"]
    return mlp_spec.submodules


def build_mlp(mlp_spec, config, pg_collection=None):
    """Build a TransformerLayer's ``mlp`` spec alone, as TransformerLayer does: ``build_module``
    for a ModuleSpec (0.16), a call with config, pg_collection and is_mtp_layer for a builder
    (0.17+)."""
    import functools

    from megatron.core.transformer.spec_utils import build_module

    if isinstance(mlp_spec, functools.partial):
        from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

        return mlp_spec(
            config=config,
            pg_collection=pg_collection or get_default_pg_collection(),
            is_mtp_layer=False,
        )
    return build_module(mlp_spec, config=config)


# --- The MoE metrics tracker. 0.16 keeps a module-level dict
# (get_moe_layer_wise_logging_tracker, reported by track_moe_metrics); 0.17 moved it into a
# MoEMetricsTracker object (get_moe_metrics_tracker(): .metrics, .report(), the old functions
# deprecated wrappers).


def moe_tracker() -> dict:
    """{name: {"values": per-layer tensor, ...}} of the metrics recorded since the last clear."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        return {
            name: {
                "values": entry.values,
                "reduce_group": entry.reduce_group,
                "avg_group": entry.avg_group,
            }
            for name, entry in moe_utils.get_moe_metrics_tracker().metrics.items()
        }
    return moe_utils.get_moe_layer_wise_logging_tracker()


def record_moe_metric(name: str, value, layer_number: int, num_layers: int, reduce_group=None):
    """One layer's value of a tracked metric: ``save_to_aux_losses_tracker`` (0.16; deprecated
    from 0.18) / ``get_moe_metrics_tracker().record`` (0.18+), the same arguments."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        moe_utils.get_moe_metrics_tracker().record(
            name=name,
            value=value,
            layer_number=layer_number,
            num_layers=num_layers,
            reduce_group=reduce_group,
        )
    else:
        moe_utils.save_to_aux_losses_tracker(
            name, value, layer_number, num_layers, reduce_group=reduce_group
        )


def clear_moe_tracker() -> None:
    """Forget every recorded metric (names included)."""
    from megatron.core.transformer.moe import moe_utils

    if hasattr(moe_utils, "get_moe_metrics_tracker"):
        moe_utils.get_moe_metrics_tracker().metrics.clear()
    else:
        moe_utils.get_moe_layer_wise_logging_tracker().clear()


def report_moe_metrics(**kwargs):
    """``track_moe_metrics(**kwargs)`` (0.16) / ``get_moe_metrics_tracker().report(**kwargs)``
    (0.18+): reduce the tracker over ranks, log, clear. ``total_loss_dict`` gets the mean over MoE
    layers of every reported name, as 0.16 gave it (0.18+ gives it only names ending in "loss";
    the others are taken from what it writes)."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "get_moe_metrics_tracker"):
        return moe_utils.track_moe_metrics(**kwargs)
    writer = _CapturingWriter(kwargs.pop("writer", None))
    totals = kwargs.get("total_loss_dict")
    log = moe_utils.get_moe_metrics_tracker().report(writer=writer, **kwargs)
    if totals is not None:
        for name, value in writer.scalars.items():
            if not name.startswith("moe/") and not name.lower().endswith("loss"):
                totals[name] = totals[name] + value if name in totals else value
    return log


class _CapturingWriter:
    """Passes add_scalar on to a TensorBoard writer (if any) and keeps the last value of each."""

    def __init__(self, writer) -> None:
        self.writer, self.scalars = writer, {}

    def add_scalar(self, name, value, step) -> None:
        self.scalars[name] = value
        if self.writer is not None:
            self.writer.add_scalar(name, value, step)


# --- Routing precision. From 0.18 topk_routing_with_score_function keeps the probabilities in
# float32 through moe_router_topk_scaling_factor and casts them to the logits' dtype last
# ("Precision notes" there); 0.16 and 0.17 cast each softmax at once and scale in that dtype.
PROBS_CAST_AFTER_SCALING = _as_tuple(MEGATRON_CORE_VERSION) >= (0, 18)

# --- Permutation. From 0.17 the unfused permute is argsort-based and keeps the first
# num_out_tokens (expert, token) slots, as TE's fused permute always did; 0.16 masked_select-ed
# exactly the routed slots whatever num_out_tokens said.
ARGSORT_PERMUTE = _as_tuple(MEGATRON_CORE_VERSION) >= (0, 17)


def batch_on_this_cp_rank(batch: dict) -> dict:
    """``megatron.core.utils.get_batch_on_this_cp_rank`` for parallel_state's context-parallel
    group. 0.19 added the required ``is_hybrid_cp`` (False here: no hybrid CP) and, given no
    ``cp_group``, splits over the whole world, so the group is always passed."""
    import inspect

    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    group = parallel_state.get_context_parallel_group()
    if "is_hybrid_cp" in inspect.signature(get_batch_on_this_cp_rank).parameters:
        return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False, cp_group=group)
    return get_batch_on_this_cp_rank(batch, cp_group=group)


# --- Dist checkpoint format. 0.19 keeps the common (non-sharded) state inside the torch_dist
# shards (a "common_state" object; metadata.json then names no common_backend and there is no
# common.pt) and still reads the older common.pt; 0.16-0.18 read common.pt only.


def unreadable_checkpoint_format(directory: str):
    """Why this megatron-core cannot read the dist checkpoint in ``directory`` and what to do
    (part of a one-line message), or None."""
    import json
    import os

    from megatron.core.dist_checkpointing import serialization

    if hasattr(serialization, "_legacy_common_state_exists"):  # reads both forms
        return None
    if os.path.isfile(os.path.join(directory, "common.pt")):
        return None
    try:
        with open(os.path.join(directory, "metadata.json")) as handle:
            metadata = json.load(handle)
    except (OSError, ValueError):
        return None  # not a checkpoint this check can judge; the load names the problem
    if "common_backend" in metadata:
        return None  # the old format with common.pt lost: a damaged checkpoint
    return (
        "a newer megatron-core (0.19 on) wrote it, with its common state inside the shards, "
        f"which megatron-core {MEGATRON_CORE_VERSION} cannot read; resume it with megatron-core "
        "0.19.x (Python 3.12: make install PYTHON=python3.12). Checkpoints go forward only: "
        "0.19 reads 0.16's"
    )
