"""The commands a fine-tuning protocol runs, each as a user types it (``sys.executable``: the
same environment): ``add-null-experts`` / ``export-hf`` for the bases, ``adamoe-finetune``,
``adamoe-eval`` (the task, the validation text) and ``tools/compute_map.py`` per run."""

from __future__ import annotations

import os
import sys

from megatron_adamoe.analysis.grid import REPO
from megatron_adamoe.analysis.protocol import EVAL_KEYS, Protocol


def _flags(options: dict) -> list[str]:
    words = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            words.append(flag)
        elif isinstance(value, list):
            words += [flag, *map(str, value)]
        elif value is not None and value is not False:
            words.append(f"{flag}={value}")  # '=': negative numbers stay values
    return words


# The commands, as a user types them (sys.executable: the same environment).
def finetune_command(protocol: Protocol, arm: str, task: str, seed: int, run_dir: str, base: str):
    options = {**protocol.common, **protocol.arms[arm]}
    options.pop("base")
    for key in EVAL_KEYS:
        options.pop(key, None)
    return [
        sys.executable,
        "-m",
        "megatron_adamoe.hf.finetune",
        "--model",
        base,
        "--data",
        protocol.tasks[task]["train"],
        "--output-dir",
        os.path.join(run_dir, "model"),
        "--seed",
        str(seed),
        "--metrics-file",
        os.path.join(run_dir, "train_metrics.jsonl"),
        *_flags(options),
    ]


def eval_command(protocol: Protocol, arm: str, task: str, run_dir: str, base: str) -> list[str]:
    return _eval_command(protocol, arm, protocol.tasks[task]["eval"], run_dir, base, "eval.json")


def validation_command(protocol: Protocol, arm: str, run_dir: str, base: str) -> list[str]:
    """The run's model scored on the protocol's validation text."""
    return _eval_command(protocol, arm, protocol.validation, run_dir, base, "validation.json")


def compute_map_command(protocol: Protocol, arm: str, run_dir: str, base: str) -> list[str]:
    """tools/compute_map.py on the run's model (its adapters or allocators on the base)."""
    method = protocol.arms[arm].get("method", protocol.common.get("method", "full"))
    tuned = os.path.join(run_dir, "model")
    model = ["--hf", tuned if method == "full" else base]
    if method in ("lora", "qlora", "ada-k"):
        model += ["--adapter", tuned]
    return [
        sys.executable,
        os.path.join(REPO, "tools/compute_map.py"),
        *model,
        "--text",
        protocol.compute_maps["text"],
        "--per-layer",
        "--out",
        os.path.join(run_dir, "compute_map"),
    ]


def _eval_command(protocol, arm, lm_task, run_dir, base, output) -> list[str]:
    tuned = os.path.join(run_dir, "model")
    method = protocol.arms[arm].get("method", protocol.common.get("method", "full"))
    model = ["--model", base] if method == "none" else ["--model", tuned]
    if method in ("lora", "qlora", "mo-lora", "ada-k"):  # adapters or allocators
        model = ["--model", base, "--adapter", tuned]
    return [
        sys.executable,
        "-m",
        "megatron_adamoe.evaluation.cli",
        *model,
        "--include-path",
        protocol.include_path,
        "--tasks",
        lm_task,
        "--baseline-topk",
        str(protocol.baseline_topk),
        *_flags({key: protocol.arms[arm].get(key) for key in sorted(EVAL_KEYS)}),
        "--output",
        os.path.join(run_dir, output),
    ]


def base_commands(protocol: Protocol, base: str, work: str) -> list[list[str]]:
    convert = [sys.executable, os.path.join(REPO, "tools/convert_checkpoint.py")]
    settings = dict(protocol.bases[base])
    checkpoints = os.path.join(work, "pretrain", settings.pop("from"), "checkpoints")
    out = os.path.join(work, "bases", base)
    if not settings:
        return [[*convert, "export-hf", "--load", checkpoints, "--out", out]]
    converted = out + "-megatron"
    return [
        [*convert, "add-null-experts", "--load", checkpoints, "--out", converted]
        + _flags(settings),
        [*convert, "export-hf", "--load", converted, "--out", out],
    ]


def command_lines(protocol: Protocol) -> list[str]:
    """The commands of the first seed of each arm and task, with the repository's paths."""
    work = os.path.join("runs/study", protocol.name)
    lines = [f"python tools/finetune_study.py {os.path.relpath(protocol.path, REPO)}"]
    for base in protocol.bases:
        lines += [" ".join(c) for c in base_commands(protocol, base, work)]
    for arm in protocol.arms:
        task, seed = next(iter(protocol.tasks)), protocol.seeds_of(arm)[0]
        run_dir = os.path.join(work, "runs", Protocol.run_name(arm, task, seed))
        base = os.path.join(work, "bases", protocol.arms[arm]["base"])
        if protocol.arms[arm].get("method") != "none":
            lines.append(" ".join(finetune_command(protocol, arm, task, seed, run_dir, base)))
        lines.append(" ".join(eval_command(protocol, arm, task, run_dir, base)))
        if protocol.validation:
            lines.append(" ".join(validation_command(protocol, arm, run_dir, base)))
        if arm in protocol.compute_maps.get("arms", []):
            lines.append(" ".join(compute_map_command(protocol, arm, run_dir, base)))
    return [line.replace(sys.executable, "python").replace(REPO + "/", "") for line in lines]
