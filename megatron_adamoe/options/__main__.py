"""``python -m megatron_adamoe.options``: the option table (docs/options.md is this output)."""

from megatron_adamoe.options.schema import describe

HEADER = """# Pretraining options

Every key of the YAML configs and every `--flag` of the entry point (Megatron's names; AdaMoE's
start with `adamoe_`). Generated from `megatron_adamoe/options/schema.py` by
`python -m megatron_adamoe.options > docs/options.md` (a test keeps it current).
"""

print(HEADER)
print(describe(markdown=True), end="")
