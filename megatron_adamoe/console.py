"""Console output of the entry points: Megatron's and torch's known, harmless warnings kept out
of the user's way. (One-line errors are megatron_adamoe.errors.)"""

from __future__ import annotations

import logging
import warnings

_KNOWN_NOISE = (
    r"Transformer Engine and Apex are not installed",
    r"Apex is not installed",
    r"full scope is deprecated",
    r"`torch.distributed.all_gather_into_tensor` is deprecated",
    r"`torch.distributed.reduce_scatter_tensor` is deprecated",
)


def quiet_known_upstream_noise() -> None:
    """Drop upstream warnings that say nothing about this run (missing Apex/TE on CPU, torch
    deprecations inside Megatron) and Megatron's INFO chatter."""
    logging.getLogger("megatron").setLevel(logging.WARNING)
    for message in _KNOWN_NOISE:
        warnings.filterwarnings("ignore", message=message)
    # TransformerLayer warns that it passes no process groups to an MLP that is not exactly
    # MoELayer; AdaMoELayer then takes them from parallel_state, as documented in the README.
    logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(
        lambda record: not record.getMessage().startswith("Unknown MLP type")
    )
