"""The supported megatron-core versions, checked once when megatron_adamoe.mcore is imported."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

SUPPORTED_MEGATRON_CORE = ("0.16.0", "0.17.0")  # [min, max)


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
            "`pip install megatron-core==0.16.1`" % SUPPORTED_MEGATRON_CORE
        ) from None
    low, high = SUPPORTED_MEGATRON_CORE
    if not _as_tuple(low) <= _as_tuple(installed) < _as_tuple(high):
        raise ImportError(
            f"megatron_adamoe supports megatron-core >={low},<{high}, found {installed}; "
            "install `megatron-core==0.16.1`"
        )
    return installed


MEGATRON_CORE_VERSION = check_megatron_core_version()
