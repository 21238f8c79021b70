"""Every module of the package imports (the unit tier builds no trainer, no converter, no study:
this catches a broken import before the slow tiers do)."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import megatron_adamoe

MODULES = sorted(
    info.name
    for info in pkgutil.walk_packages(megatron_adamoe.__path__, "megatron_adamoe.")
    if not info.name.endswith("__main__")
)


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
