"""A script of tools/ loaded as a module, for tests that call its functions in this process."""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

from tests.runs import REPO


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
