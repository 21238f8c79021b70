"""The standalone Hugging Face files carry generated copies of package code (the routing rules):
each copy equals its source, and the shared code imports nothing (remote code loads without
this package)."""

from __future__ import annotations

import ast
import os

from tests.tools import load_tool

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_every_generated_copy_equals_its_source():
    tool = load_tool("sync_standalone")
    assert tool.COPIES
    for target, source in tool.COPIES:
        with open(os.path.join(REPO, target)) as handle:
            text = handle.read()
        assert tool.generated(text, source) == text, (
            f"{target} is stale: run python tools/sync_standalone.py"
        )
        assert tool.shared_part(source) in text
    assert tool.main(["--check"]) == 0


def test_an_edited_copy_is_drift():
    tool = load_tool("sync_standalone")
    target, source = tool.COPIES[0]
    with open(os.path.join(REPO, target)) as handle:
        text = handle.read()
    edited = text.replace(
        'NULL_EXPERT_TYPES = ("zero", "identity")', 'NULL_EXPERT_TYPES = ("zero",)'
    )
    assert edited != text and tool.generated(edited, source) == text


def test_shared_code_imports_nothing_and_its_targets_import_what_it_uses():
    """The shared parts import nothing themselves; what their sources import at the top comes
    from the standard library or torch, or from a package module whose standalone copy the
    target imports instead (``STANDALONE_MODULES``), and the target imports it too."""
    tool = load_tool("sync_standalone")
    for target, source in tool.COPIES:
        shared = ast.parse(tool.shared_part(source))
        assert not [n for n in ast.walk(shared) if isinstance(n, (ast.Import, ast.ImportFrom))]
        with open(os.path.join(REPO, source)) as handle:
            header = ast.parse(handle.read().split(tool.SOURCE_MARKER)[0])
        with open(os.path.join(REPO, target)) as handle:
            target_body = ast.parse(handle.read()).body
        target_imports = {_import_key(n) for n in target_body if _is_import(n)}
        for node in header.body:
            if not _is_import(node):
                continue
            module, names = _import_key(node)
            if module in tool.STANDALONE_MODULES:
                module = tool.STANDALONE_MODULES[module]
            else:
                assert module.split(".")[0] in ("__future__", "typing", "dataclasses", "torch"), (
                    source,
                    module,
                )
            assert any(m == module and names <= n for m, n in target_imports), (target, module)


def _is_import(node) -> bool:
    return isinstance(node, (ast.Import, ast.ImportFrom))


def _import_key(node) -> tuple[str, frozenset]:
    if isinstance(node, ast.Import):
        return node.names[0].name, frozenset()
    return "." * node.level + (node.module or ""), frozenset(a.name for a in node.names)
