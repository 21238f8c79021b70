"""The option vocabulary and the pretraining option schema, in one torch-free place.

- ``vocab``: every enumeration (null types, weight norms, router modes, FP8 recipes, ...), MoE
  layer indices, vocabulary padding, the shared k / n / m / EP rule;
- ``schema``: ``PretrainArguments``, one default and one-line doc per option (``--help``,
  ``docs/options.md``: ``python -m megatron_adamoe.options > docs/options.md``);
- ``rules``: every check, one-line ``OptionError``s; ``loading``: YAML + command line.
"""

from megatron_adamoe.options import vocab
from megatron_adamoe.options.loading import load_arguments, parse_overrides, resolved_yaml
from megatron_adamoe.options.rules import resolve, validate
from megatron_adamoe.options.schema import (
    CHOICES,
    PretrainArguments,
    describe,
    settable_fields,
)

__all__ = [
    "CHOICES",
    "PretrainArguments",
    "describe",
    "load_arguments",
    "parse_overrides",
    "resolve",
    "resolved_yaml",
    "settable_fields",
    "validate",
    "vocab",
]
