"""Reading the options: a YAML file, then command-line overrides in Megatron's flag spelling
(``--moe-router-topk 3``, ``--bf16``, ``--no-bf16``), then the checks of ``options.rules``.
Torch-free, so the launch script checks a config in a fraction of a second."""

from __future__ import annotations

import difflib
import os
import typing
from typing import Any, Optional

import yaml

from megatron_adamoe.errors import OptionError
from megatron_adamoe.options.rules import resolve, validate
from megatron_adamoe.options.schema import PretrainArguments, settable_fields


def _coerce(name: str, value: Any, source: str) -> Any:
    """Check a raw YAML/CLI value against the field's declared type."""
    hint = typing.get_type_hints(PretrainArguments)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    if value is None:
        if optional:
            return None
        raise OptionError(f"{name} (None) must be set ({source}); give it a value or drop the key")
    allowed = [a for a in args if a is not type(None)] or [hint]
    if name == "data_path" and isinstance(value, str):
        value = value.split()
    for kind in allowed:
        if kind is float and isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is list and isinstance(value, list):
            return value
        if kind in (int, bool, str) and type(value) is kind:
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise OptionError(f"{name} ({value!r}) must be {names} ({source}); fix the value")


def _unknown_key(key: str, source: str) -> OptionError:
    guess = difflib.get_close_matches(key, list(settable_fields()), n=1, cutoff=0.5)
    hint = f"did you mean '{guess[0]}'?" if guess else "the keys are PretrainArguments fields"
    return OptionError(f"config key '{key}' ({source}) is not a known option; {hint}")


def _yaml_error(path: str, error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = getattr(error, "problem", None) or "invalid YAML"
    return f"config ({path!r}) must be valid YAML: {problem}{where}; fix the file"


def parse_overrides(argv: list[str]) -> dict[str, Any]:
    """``--moe-router-topk 3 --bf16 --no-swiglu --data-path a b`` -> {key: value}."""
    overrides: dict[str, Any] = {}
    index = 0
    while index < len(argv):
        token = argv[index]
        if not token.startswith("--"):
            raise OptionError(
                f"command-line argument ({token!r}) must be a --flag or its value; "
                "write overrides as --key value"
            )
        flag, _, inline = token[2:].partition("=")
        values = [inline] if inline else []
        index += 1
        while not inline and index < len(argv) and not argv[index].startswith("--"):
            values.append(argv[index])
            index += 1
        key = flag.replace("-", "_")
        if not values and key.startswith("no_") and key[3:] in settable_fields():
            overrides[key[3:]] = False
        elif not values:
            overrides[key] = True
        elif len(values) == 1:
            overrides[key] = yaml.safe_load(values[0])
        else:
            overrides[key] = [yaml.safe_load(v) for v in values]
    return overrides


def load_arguments(
    config_path: Optional[str], overrides: Optional[dict] = None, world_size: int = 1
) -> PretrainArguments:
    """YAML file, then overrides, then validation; returns the resolved options."""
    raw: dict[str, Any] = {}
    if config_path is not None:
        if not os.path.isfile(config_path):
            raise OptionError(
                f"config ({config_path!r}) must be an existing YAML file; check the path"
            )
        with open(config_path) as handle:
            try:
                loaded = yaml.safe_load(handle) or {}
            except yaml.YAMLError as error:
                raise OptionError(_yaml_error(config_path, error)) from None
        if not isinstance(loaded, dict):
            raise OptionError(f"config ({config_path!r}) must be a YAML mapping of key: value")
        raw.update({k: (v, os.path.basename(config_path)) for k, v in loaded.items()})
    raw.update({k: (v, "command line") for k, v in (overrides or {}).items()})
    fields = settable_fields()
    values = {}
    for key, (value, source) in raw.items():
        if key not in fields:
            raise _unknown_key(key, source)
        values[key] = _coerce(key, value, source)
    args = PretrainArguments(**values, world_size=world_size)
    validate(args)
    return resolve(args)


def resolved_yaml(args: PretrainArguments) -> str:
    """The fully resolved options (every key), as written next to each checkpoint."""
    return yaml.safe_dump(args.to_dict(), sort_keys=False)
