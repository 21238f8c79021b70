"""Strict loading into a model built on the meta device: every tensor present, expected and of
the right shape, or one line listing each that is not."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from megatron_adamoe.errors import OptionError

MAX_LISTED = 12


def listing(names) -> str:
    names = sorted(names)
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f" (+{len(names) - MAX_LISTED} more)" if len(names) > MAX_LISTED else "")


def check_tensors(expected: dict, tensors: dict, what: str) -> None:
    """``expected``: name -> shape. Raises one ValueError naming every mismatch."""
    missing = set(expected) - set(tensors)
    unexpected = set(tensors) - set(expected)
    misshaped = [
        f"{name} {tuple(tensors[name].shape)} != {tuple(shape)}"
        for name, shape in expected.items()
        if name in tensors and tuple(tensors[name].shape) != tuple(shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing: {listing(missing)}")
    if unexpected:
        problems.append(f"unexpected: {listing(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped: {listing(misshaped)}")
    if problems:
        raise OptionError(
            f"{what} must match the target model tensor for tensor; " + "; ".join(problems)
        )


def load_strictly(
    model: torch.nn.Module, tensors: dict, what: str, ignore: Optional[Callable[[str], bool]] = None
) -> None:
    """Load ``tensors`` into ``model`` (built on the meta device) by assignment, strictly."""
    ignore = ignore or (lambda name: False)
    expected = {
        name: value.shape
        for name, value in model.state_dict().items()
        if not ignore(name) and isinstance(value, torch.Tensor)
    }
    check_tensors(expected, tensors, what)
    incompatible = model.load_state_dict(tensors, strict=False, assign=True)
    left = [name for name in incompatible.missing_keys if not ignore(name)]
    assert not left and not incompatible.unexpected_keys, (left, incompatible.unexpected_keys)
    # Buffers outside the state dict (the routers' per-step counters) start at zero.
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.zeros(buffer.shape, dtype=buffer.dtype)
    on_meta = [
        name
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_meta
    ]
    if on_meta:
        raise OptionError(
            f"{what} must provide every tensor; still on the meta device: {listing(on_meta)}"
        )
