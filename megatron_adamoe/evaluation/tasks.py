"""Local lm-evaluation-harness tasks, offline. ``NAME=FILE.jsonl`` makes a multiple-choice task
from question/choices/answer records (the fine-tuning format): each record rendered once by
``hf.finetune_data.render_choice`` (the prompt fine-tuning trains on) into a JSONL beside a task
YAML with ``dataset_path: json``, so lm-eval scores ``" " + choice`` after that prompt, as
fine-tuning trained it. Task YAMLs of your own go in an ``--include-path`` directory."""

from __future__ import annotations

import json
import os

from megatron_adamoe.data.corpus import iter_jsonl
from megatron_adamoe.errors import OptionError
from megatron_adamoe.hf.finetune_data import render_choice

_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def parse_tasks(spec: str) -> list[tuple[str, str | None]]:
    """``"a,b=path.jsonl"`` -> [("a", None), ("b", "path.jsonl")] (checked, one line each)."""
    tasks = []
    for item in (part.strip() for part in spec.split(",")):
        name, _, path = item.partition("=")
        if not name or (item.count("=") and not path):
            raise OptionError(
                f"tasks ({spec!r}) must be comma-separated NAME or NAME=FILE.jsonl items, e.g. "
                "next_line=tasks/next_line_test.jsonl"
            )
        if path and not os.path.isfile(path):
            raise OptionError(f"tasks ({item!r}) names no file {path!r}; check the path")
        tasks.append((name, path or None))
    return tasks


def write_local_task(name: str, path: str, template: str, directory: str) -> None:
    """``directory``/``name``.yaml and its rendered records."""
    rendered = os.path.join(directory, f"{name}.jsonl")
    count = 0
    with open(rendered, "w") as out:
        for where, record in iter_jsonl(path):
            query, choices, gold = render_choice(record, where, template)
            out.write(json.dumps({"query": query, "choices": choices, "gold": gold}) + "\n")
            count += 1
    if not count:
        raise OptionError(f"tasks ({name}={path}) holds no records; add some")
    with open(os.path.join(directory, f"{name}.yaml"), "w") as handle:
        handle.write(_YAML.format(name=name, data=json.dumps(os.path.abspath(rendered))))
