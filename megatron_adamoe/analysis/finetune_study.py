"""The paper's fine-tuning protocol (Table 1) as a reproducible study: one pretrained base, arms
of fine-tuning recipes x tasks x seeds, each scored by ``adamoe-eval``.

A protocol file (YAML, e.g. ``configs/study/cpu_table1.yaml``) names the pretraining runs that
make the bases (an arm and seed of a pretraining study grid, run as that grid runs it, with
optional overrides, e.g. the dense twin), the bases made from them (``export-hf`` of a
checkpoint, or ``add-null-experts`` first), the tasks (a
fine-tuning JSONL and an lm-eval task), optionally a ``validation`` lm-eval perplexity task every
run is also scored on (``validation.json``: bits per byte, Load and FLOPs on held-out text),
``adamoe-finetune`` flags common to every arm, the arms (a base plus their own flags;
``method: none`` scores the base as it is, ``topk`` there with another k per token), the seeds
and optionally ``compute_maps`` (``tools/compute_map.py`` over a text for some arms' runs of
one seed: true experts per token by layer, token class and frequency). Every
step is one of the project's commands as a user types it, run as a process of its own; a step
whose output exists is skipped, so rerunning the same command resumes a stopped protocol. The
report under ``<out>/<name>/`` (``results.csv``, ``accuracy_flops.png``, ``README.md``) keeps
each run's ``eval.json`` and training metrics, so ``--report-only`` rebuilds it from a clone.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional

import yaml

from megatron_adamoe.analysis import study
from megatron_adamoe.analysis.finetune_report import render, write_plot, write_validation_plot
from megatron_adamoe.analysis.grid import REPO, load_grid
from megatron_adamoe.errors import OptionError

KEYS = {
    "name",
    "description",
    "pretrain",
    "bases",
    "tasks",
    "include_path",
    "seeds",
    "baseline_topk",
    "common",
    "arms",
    "discussion",
    "validation",
    "compute_maps",
}
COMPUTE_MAP_KEYS = {"text", "seed", "arms"}
MAP_FILES = ("summary.json", "compute_map.png", "compute_map.html")
BASE_KEYS = {"from", "num_null_experts", "topk", "null_router_init"}
PRETRAIN_KEYS = {"grid", "arm", "seed", "overrides"}
RESERVED = {"model", "data", "output_dir", "checkpoint_dir", "seed", "metrics_file", "resume"}
EVAL_KEYS = {"topk"}  # adamoe-eval's, for method: none arms (the base routed with another k)
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


@dataclass
class Protocol:
    name: str
    path: str
    pretrain: dict[str, dict]
    bases: dict[str, dict]
    tasks: dict[str, dict]
    include_path: str
    seeds: list[int]
    baseline_topk: int
    common: dict
    arms: dict[str, dict]
    description: str = ""
    discussion: str = ""
    validation: str = ""
    compute_maps: dict = dataclasses.field(default_factory=dict)

    def has_map(self, arm: str, seed: int) -> bool:
        maps = self.compute_maps
        return arm in maps.get("arms", []) and seed in (maps.get("seed"), 0)

    def seeds_of(self, arm: str) -> list[int]:
        """A ``method: none`` arm is the base scored as it is: one run, seed 0."""
        return [0] if self.arms[arm].get("method") == "none" else self.seeds

    def runs(self) -> list[tuple[str, str, int]]:
        """Seed-major, as the pretraining harness orders its runs."""
        seeds = sorted({s for arm in self.arms for s in self.seeds_of(arm)})
        return [
            (arm, task, seed)
            for seed in seeds
            for arm in self.arms
            if seed in self.seeds_of(arm)
            for task in self.tasks
        ]

    @staticmethod
    def run_name(arm: str, task: str, seed: int) -> str:
        return f"{arm}-{task}-seed{seed}"


def load_protocol(path: str) -> Protocol:
    if not os.path.isfile(path):
        raise OptionError(f"protocol ({path!r}) must be an existing YAML file; see configs/study/")
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    unknown = sorted(set(raw) - KEYS)
    if unknown:
        raise OptionError(f"protocol keys ({', '.join(unknown)}) must be among {sorted(KEYS)}")
    for key in ("name", "pretrain", "bases", "tasks", "seeds", "arms"):
        if not raw.get(key):
            raise OptionError(f"protocol key {key} must be set; fix {path}")
    for name, pretrain in raw["pretrain"].items():
        if not {"grid", "arm", "seed"} <= set(pretrain or {}) <= PRETRAIN_KEYS:
            raise OptionError(
                f"pretrain.{name} ({pretrain}) must name grid, arm and seed (and may give "
                f"overrides); fix {path}"
            )
        if pretrain["arm"] not in load_grid(os.path.join(REPO, pretrain["grid"])).arms:
            raise OptionError(
                f"pretrain.{name}.arm ({pretrain['arm']!r}) must be an arm of {pretrain['grid']}"
            )
    for base, settings in raw["bases"].items():
        bad = sorted(set(settings or {}) - BASE_KEYS)
        if bad:
            raise OptionError(
                f"bases.{base} keys ({', '.join(bad)}) must be among {sorted(BASE_KEYS)} "
                "(from: a pretraining run; add-null-experts' flags, or none: the model as it is)"
            )
        if (settings or {}).get("from") not in raw["pretrain"]:
            raise OptionError(
                f"bases.{base}.from ({(settings or {}).get('from')!r}) must be one of the "
                f"pretraining runs ({', '.join(raw['pretrain'])})"
            )
    for task, files in raw["tasks"].items():
        if set(files or {}) != {"train", "eval"}:
            raise OptionError(f"tasks.{task} must name train (JSONL) and eval (an lm-eval task)")
    flags = _finetune_flags()
    for where, options in [("common", raw.get("common") or {}), *raw["arms"].items()]:
        options = {k: v for k, v in options.items() if k != "base" and k not in EVAL_KEYS}
        bad = sorted((set(options) - flags) | (set(options) & RESERVED))
        if bad:
            raise OptionError(
                f"protocol {where} options ({', '.join(bad)}) must be adamoe-finetune flags the "
                f"harness does not set itself ({', '.join(sorted(RESERVED))}); fix {path}"
            )
    for arm, options in raw["arms"].items():
        if "topk" in options and options.get("method") != "none":
            raise OptionError(
                f"arms.{arm}.topk ({options['topk']}) is for method: none arms (the base scored "
                "with another k); a fine-tuned arm keeps its base's k: drop topk"
            )
        if options.get("base") not in raw["bases"]:
            raise OptionError(
                f"arms.{arm}.base ({options.get('base')!r}) must be one of the bases "
                f"({', '.join(raw['bases'])})"
            )
    return Protocol(
        name=raw["name"],
        path=path,
        pretrain=raw["pretrain"],
        bases=raw["bases"],
        tasks=raw["tasks"],
        include_path=raw.get("include_path", "configs/tasks"),
        seeds=[int(s) for s in raw["seeds"]],
        baseline_topk=int(raw.get("baseline_topk", 2)),
        common=raw.get("common") or {},
        arms=raw["arms"],
        description=raw.get("description", ""),
        discussion=raw.get("discussion", ""),
        validation=raw.get("validation") or "",
        compute_maps=_compute_maps(raw, path),
    )


def _compute_maps(raw: dict, path: str) -> dict:
    maps = raw.get("compute_maps") or {}
    if not maps:
        return {}
    if set(maps) != COMPUTE_MAP_KEYS:
        raise OptionError(
            f"compute_maps keys ({', '.join(sorted(maps))}) must be {sorted(COMPUTE_MAP_KEYS)}: "
            f"the text, the seed whose runs are mapped and the arms; fix {path}"
        )
    if maps["seed"] not in raw["seeds"]:
        raise OptionError(f"compute_maps.seed ({maps['seed']}) must be one of the seeds")
    for arm in maps["arms"]:
        options = raw["arms"].get(arm)
        if options is None or options.get("method") == "mo-lora" or "topk" in options:
            raise OptionError(
                f"compute_maps.arms ({arm!r}) must name arms of MoE models routed as exported "
                "(not mo-lora, no topk)"
            )
    return maps


def _finetune_flags() -> set[str]:
    from megatron_adamoe.hf.finetune_flags import build_parser

    return {action.dest for action in build_parser("flags\n\n")._actions} - {"help", "config"}


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
    text = render(protocol, rows, study.machine(), commands=_commands(protocol))
    path = os.path.join(report_dir, "README.md")
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return path


def _commands(protocol: Protocol) -> list[str]:
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
