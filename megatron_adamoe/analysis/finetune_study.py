"""The paper's fine-tuning protocol (Table 1) as a reproducible study: one pretrained base, arms
of fine-tuning recipes x tasks x seeds, each scored by ``adamoe-eval`` (the protocol file:
``analysis.protocol``; its commands: ``analysis.finetune_commands``).

Every step is one of the project's commands as a user types it, run as a process of its own; a
step whose output exists is skipped, so rerunning the same command resumes a stopped protocol,
and a protocol given ``validation`` or ``compute_maps`` later runs only those. The report under
``<out>/<name>/`` (``results.csv``, ``accuracy_flops.png``, ``validation_flops.png``,
``README.md``) keeps each run's ``eval.json``, ``validation.json``, compute map and training
metrics, so ``--report-only`` rebuilds it from a clone.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import time
from typing import Callable, Optional

from megatron_adamoe.analysis import study
from megatron_adamoe.analysis.finetune_commands import (
    base_commands,
    command_lines,
    compute_map_command,
    eval_command,
    finetune_command,
    validation_command,
)
from megatron_adamoe.analysis.finetune_report import render, write_plot, write_validation_plot
from megatron_adamoe.analysis.grid import REPO, load_grid
from megatron_adamoe.analysis.protocol import Protocol

MAP_FILES = ("summary.json", "compute_map.png")  # the HTML page (~0.7 MB) stays in the work dir
CSV_COLUMNS = (
    "arm",
    "task",
    "seed",
    "acc",
    "acc_stderr",
    "acc_norm",
    "load_mean",
    "expert_flops_pct",
    "model_flops_pct",
    "final_train_loss",
    "wall_s",
    "val_bits_per_byte",
    "val_load_mean",
    "val_model_flops_pct",
)
VALIDATION_COLUMNS = {
    "val_bits_per_byte": "bits_per_byte",
    "val_load_mean": "load_mean",
    "val_model_flops_pct": "model_flops_pct",
}


def _step(command: list[str], log_path: str, launch: Callable) -> float:
    """Run one command, output appended to ``log_path``; one line naming the log on failure."""
    started = time.time()
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        returncode = launch(command, log, lambda: None)
    if returncode != 0:
        raise RuntimeError(f"step failed ({returncode}); see {log_path}; rerun to resume")
    return time.time() - started


def run_protocol(
    protocol: Protocol,
    runs_dir: str,
    out_dir: str,
    progress: bool = True,
    launch: Callable = study.launch_subprocess,
) -> None:
    """The pretraining run, the bases, then every missing (arm, task, seed): fine-tune, score,
    keep in the report; the report refreshed after each run. Progress with ETA."""
    from tqdm import tqdm

    work = os.path.join(runs_dir, protocol.name)
    report_dir = os.path.join(out_dir, protocol.name)
    os.makedirs(report_dir, exist_ok=True)
    for name in protocol.pretrain:
        _pretrain(protocol, name, work, progress, launch)
    for base in protocol.bases:
        if not os.path.isdir(os.path.join(work, "bases", base)):
            os.makedirs(os.path.join(work, "bases"), exist_ok=True)
            for command in base_commands(protocol, base, work):
                target = command[command.index("--out") + 1]
                if not os.path.isdir(target):
                    _step(command, os.path.join(work, "bases", f"{base}.log"), launch)
    todo = [run for run in protocol.runs() if _missing(protocol, _run_dir(work, *run), run)]
    bar = tqdm(total=len(todo), unit="run", disable=not progress, desc=protocol.name)
    for arm, task, seed in todo:
        name = Protocol.run_name(arm, task, seed)
        bar.set_postfix_str(name)
        run_dir = _run_dir(work, arm, task, seed)
        keep_dir = os.path.join(report_dir, "runs", name)
        os.makedirs(run_dir, exist_ok=True)
        base = os.path.join(work, "bases", protocol.arms[arm]["base"])
        log = os.path.join(run_dir, "run.log")
        timing = {}
        missing = _missing(protocol, run_dir, (arm, task, seed))
        if "eval.json" in missing:
            wall = 0.0
            if protocol.arms[arm].get("method") != "none" and not os.path.isdir(
                os.path.join(run_dir, "model")
            ):
                for stale in ("model-checkpoints", "train_metrics.jsonl"):  # a stopped attempt's
                    path = os.path.join(run_dir, stale)
                    shutil.rmtree(path) if os.path.isdir(path) else None
                    os.remove(path) if os.path.isfile(path) else None
                command = finetune_command(protocol, arm, task, seed, run_dir, base)
                wall += _step(command, log, launch)
            wall += _step(eval_command(protocol, arm, task, run_dir, base), log, launch)
            timing["wall_s"] = round(wall, 1)
        if "validation.json" in missing:
            command = validation_command(protocol, arm, run_dir, base)
            timing["validation_wall_s"] = round(_step(command, log, launch), 1)
        if "compute_map" in missing:
            command = compute_map_command(protocol, arm, run_dir, base)
            timing["compute_map_wall_s"] = round(_step(command, log, launch), 1)
        _keep(run_dir, keep_dir, timing)
        write_report(protocol, out_dir)
        bar.update(1)
    bar.close()
    write_report(protocol, out_dir)


def _run_dir(work: str, arm: str, task: str, seed: int) -> str:
    return os.path.join(work, "runs", Protocol.run_name(arm, task, seed))


def _missing(protocol: Protocol, run_dir: str, run: tuple) -> list[str]:
    """What a run still lacks: eval.json (its task), validation.json (if asked), compute_map
    (if its arm and seed are mapped)."""
    wanted = {"eval.json": "eval.json"}
    if protocol.validation:
        wanted["validation.json"] = "validation.json"
    if protocol.has_map(run[0], run[2]):
        wanted["compute_map"] = os.path.join("compute_map", "summary.json")
    return [key for key, name in wanted.items() if not os.path.isfile(os.path.join(run_dir, name))]


def _pretrain(protocol: Protocol, name: str, work: str, progress: bool, launch: Callable) -> None:
    """One pretraining run, exactly as its study grid runs that arm and seed (plus its
    overrides, as one more arm of that grid)."""
    run_dir = os.path.join(work, "pretrain", name)
    if os.path.isfile(os.path.join(run_dir, "done.json")):
        return
    from tqdm import tqdm

    settings = protocol.pretrain[name]
    grid = load_grid(os.path.join(REPO, settings["grid"]))
    arm, seed = settings["arm"], int(settings["seed"])
    if settings.get("overrides"):
        arm = f"{arm}+{name}"
        grid = dataclasses.replace(
            grid, arms={**grid.arms, arm: {**grid.arms[settings["arm"]], **settings["overrides"]}}
        )
    os.makedirs(run_dir, exist_ok=True)
    bar = tqdm(total=grid.options(arm).train_iters, unit="it", disable=not progress)
    bar.set_description(f"pretraining {name} ({arm}, seed {seed})")
    wall = study._run_one(grid, arm, seed, run_dir, bar, launch)
    bar.close()
    with open(os.path.join(run_dir, "done.json"), "w") as handle:
        json.dump({"wall_s": wall, "commit": study._git_commit()}, handle)


def _keep(run_dir: str, keep_dir: str, timing: dict) -> None:
    """eval.json, validation.json, the training metrics and the steps' wall times (added to what
    an earlier pass kept: a validation score added later keeps the run's own wall time)."""
    os.makedirs(keep_dir, exist_ok=True)
    names = ["eval.json", "validation.json", "train_metrics.jsonl"]
    names += [os.path.join("compute_map", name) for name in MAP_FILES]
    for name in names:
        if os.path.isfile(os.path.join(run_dir, name)):
            os.makedirs(os.path.dirname(os.path.join(keep_dir, name)), exist_ok=True)
            shutil.copyfile(os.path.join(run_dir, name), os.path.join(keep_dir, name))
    path = os.path.join(keep_dir, "done.json")
    done = {}
    if os.path.isfile(path):
        with open(path) as handle:
            done = json.load(handle)
    commit = study._git_commit()
    if "wall_s" in timing:
        done["commit"] = commit
    if "validation_wall_s" in timing:
        done["validation_commit"] = commit
    done.update(timing)
    with open(path + ".tmp", "w") as handle:
        json.dump(done, handle)
    os.replace(path + ".tmp", path)


def collect(protocol: Protocol, out_dir: str) -> list[dict]:
    """One row per finished run kept in the report directory, from its own eval.json."""
    rows = []
    for arm, task, seed in protocol.runs():
        keep = os.path.join(out_dir, protocol.name, "runs", Protocol.run_name(arm, task, seed))
        if not os.path.isfile(os.path.join(keep, "done.json")):
            continue
        with open(os.path.join(keep, "eval.json")) as handle:
            scores = next(iter(json.load(handle)["tasks"].values()))
        with open(os.path.join(keep, "done.json")) as handle:
            done = json.load(handle)
        row = {"arm": arm, "task": task, "seed": seed, "wall_s": done.get("wall_s")}
        row.update({k: scores.get(k) for k in CSV_COLUMNS if k in scores})
        if os.path.isfile(os.path.join(keep, "validation.json")):
            with open(os.path.join(keep, "validation.json")) as handle:
                validation = next(iter(json.load(handle)["tasks"].values()))
            row.update({k: validation.get(v) for k, v in VALIDATION_COLUMNS.items()})
        summary = os.path.join(keep, "compute_map", "summary.json")
        if os.path.isfile(summary):
            with open(summary) as handle:
                row["compute_map"] = json.load(handle)
        row["final_train_loss"] = _final_train_loss(os.path.join(keep, "train_metrics.jsonl"))
        rows.append(row)
    return rows


def _final_train_loss(path: str) -> Optional[float]:
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        losses = [json.loads(line).get("loss") for line in handle if line.strip()]
    losses = [loss for loss in losses if loss is not None]
    return losses[-1] if losses else None


def write_report(protocol: Protocol, out_dir: str) -> Optional[str]:
    rows = collect(protocol, out_dir)
    if not rows:
        return None
    report_dir = os.path.join(out_dir, protocol.name)
    path = os.path.join(report_dir, "results.csv")
    with open(path + ".tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: f"{row[k]:.6g}" if isinstance(row.get(k), float) else row.get(k)
                    for k in CSV_COLUMNS
                }
            )
    os.replace(path + ".tmp", path)
    write_plot(protocol, rows, os.path.join(report_dir, "accuracy_flops.png"))
    if any(row.get("val_bits_per_byte") is not None for row in rows):
        write_validation_plot(protocol, rows, os.path.join(report_dir, "validation_flops.png"))
    text = render(protocol, rows, study.machine(), commands=command_lines(protocol))
    path = os.path.join(report_dir, "README.md")
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return path
