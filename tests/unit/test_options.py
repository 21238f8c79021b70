"""One vocabulary, one schema: the standalone HF files' router dtypes equal the package's,
every option is documented, docs/options.md is what the schema generates, the entry point's
--help lists it."""

from __future__ import annotations

import io
import os
from contextlib import redirect_stdout

from megatron_adamoe.hf import configuration_adamoe, modeling_adamoe
from megatron_adamoe.options import describe, settable_fields, vocab

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_hf_remote_code_router_dtypes_equal_the_package_vocabulary():
    """(The routing vocabularies are generated copies: tests/unit/test_standalone.py.)"""
    assert configuration_adamoe.ROUTER_DTYPES == tuple(vocab.ROUTER_DTYPE_TO_HF.values())
    assert set(modeling_adamoe._ROUTER_DTYPES) == set(vocab.ROUTER_DTYPE_TO_HF.values())


def test_every_option_has_a_group_and_a_one_line_doc():
    for name, field in settable_fields().items():
        doc = field.metadata.get("doc", "")
        assert doc and "\n" not in doc and field.metadata.get("group"), name


def test_docs_options_md_is_generated_from_the_schema():
    import runpy

    output = io.StringIO()
    with redirect_stdout(output):
        runpy.run_module("megatron_adamoe.options", run_name="__main__")
    with open(os.path.join(REPO, "docs", "options.md")) as handle:
        assert handle.read() == output.getvalue(), (
            "docs/options.md is stale: python -m megatron_adamoe.options > docs/options.md"
        )
    assert all(f"`{name}`" in output.getvalue() for name in settable_fields())


def test_entry_point_help_lists_every_option(capsys):
    from megatron_adamoe.training.pretrain import main

    assert main(["--help"]) == 0
    printed = capsys.readouterr().out
    assert all(f"--{name.replace('_', '-')}" in printed for name in settable_fields())
    assert describe(markdown=False) in printed
