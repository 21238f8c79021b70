"""A reproducible study: a grid of configs x seeds through the real pretraining entry point.

A grid file (YAML, e.g. ``configs/study/cpu_shakespeare.yaml``) names a base config, options common
to every arm (data, tokens, optimizer, schedule, validation: only routing may differ between arms),
the arms, the seeds and one data seed (every run reads the same batches and the same validation
set; seeds change the initialisation only). ``run_grid`` runs what is missing: a finished run has
``done.json`` and is skipped, a half-finished one resumes from its own checkpoints. After each run
it refreshes the report under ``<out>/<name>/``: ``results.csv`` (one row per run), the plots and
``README.md``, and keeps each run's metrics there (``runs/<run>/metrics.jsonl.gz``), so the report
can be rebuilt from the committed files alone (``--report-only``).
"""

from __future__ import annotations

import csv
import datetime
import gzip
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from statistics import fmean, median, pstdev
from typing import Callable, Optional

import yaml

from megatron_adamoe.analysis import continued, plots, report
from megatron_adamoe.analysis.runs import Run, read_run
from megatron_adamoe.errors import OptionError
from megatron_adamoe.options import PretrainArguments, settable_fields
from megatron_adamoe.options.rules import validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCH = "launch/pretrain_adamoe.sh"
CSV_COLUMNS = (
    "config",
    "seed",
    "n",
    "m",
    "k",
    "steps",
    "tokens",
    "final_val_loss",
    "best_val_loss",
    "mean_load",
    "expert_flops_vs_baseline",
    "model_flops_vs_baseline",
    "tokens_per_s",
    "wall_s",
    "commit",
)
GRID_KEYS = {
    "name",
    "description",
    "base_config",
    "nproc",
    "seeds",
    "data_seed",
    "flops_baseline_topk",
    "common",
    "arms",
    "families",
    "reuse",
    "continue_from",
    "discussion",
}


@dataclass
class Grid:
    name: str
    path: str
    base_config: str
    nproc: int
    seeds: list[int]
    data_seed: int
    baseline_topk: int
    common: dict
    arms: dict[str, dict]
    families: dict[str, str]
    description: str = ""
    discussion: str = ""
    reused: dict[str, str] = field(default_factory=dict)  # arm -> its grid's name
    continued: dict[str, dict] = field(default_factory=dict)  # arm -> its source (continued.py)

    def run_name(self, arm: str, seed: int) -> str:
        return f"{arm}-seed{seed}"

    def runs(self) -> list[tuple[str, int]]:
        """Seed-major: every arm of seed 1, then of seed 2, ...; a stopped grid then has whole
        seeds, and slow periods of a shared machine spread over the arms."""
        return [(arm, seed) for seed in self.seeds for arm in self.arms]

    def options(self, arm: Optional[str]) -> PretrainArguments:
        """The arm's resolved options (base config, then common, then the arm's own; None: no
        arm's)."""
        with open(os.path.join(REPO, self.base_config)) as handle:
            values = yaml.safe_load(handle) or {}
        values.update(self.common)
        values.update(self.arms[arm] if arm is not None else {})
        fields = settable_fields()
        return PretrainArguments(**{k: v for k, v in values.items() if k in fields})

    def own_runs(self) -> list[tuple[str, int]]:
        """The runs this grid makes (a reused arm's runs were made by its own grid)."""
        return [(arm, seed) for arm, seed in self.runs() if arm not in self.reused]

    def keep_dir(self, out_dir: str, arm: str) -> str:
        """Where an arm's finished runs are kept: this grid's report, or the reused grid's."""
        return os.path.join(out_dir, self.reused.get(arm, self.name), "runs")

    def family(self, arm: str) -> str:
        if arm in self.families:
            return self.families[arm]
        return "top-k" if self.is_topk(arm) else "AdaMoE"

    def is_topk(self, arm: str) -> bool:
        """Stock top-k routing (no null experts): the arms that draw a frontier."""
        return not self.options(arm).adamoe_num_null_experts

    def expert_shape(self, arm: str) -> tuple[int, int]:
        """(true experts, expert FFN width): the arms of one shape share a frontier."""
        return self.options(arm).num_experts, expert_width(self.options(arm))

    def group(self, arm: str) -> tuple:
        """Arms compared with one frontier: one expert shape, one token budget, one start, one
        way of balancing (the aux loss, or the aux-loss-free expert bias)."""
        source = self.continued.get(arm)
        start = (source["grid"], source["arm"]) if source else None
        options = self.options(arm)
        balancing = "expert bias" if options.moe_router_enable_expert_bias else "aux loss"
        return (*self.expert_shape(arm), options.train_iters, start, balancing)

    def baseline_shape(self) -> tuple[int, int]:
        """The expert shape of the base config with the common options (top-``baseline_topk``
        of these experts is the FLOPs baseline)."""
        options = self.options(None)
        return options.num_experts, expert_width(options)


def expert_width(options: PretrainArguments) -> int:
    return options.moe_ffn_hidden_size or options.ffn_hidden_size or 4 * options.hidden_size


def load_grid(path: str) -> Grid:
    if not os.path.isfile(path):
        raise OptionError(f"grid ({path!r}) must be an existing YAML file; see configs/study/")
    with open(path) as handle:
        raw = yaml.safe_load(handle) or {}
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        raise OptionError(
            f"grid keys ({', '.join(unknown)}) must be among {sorted(GRID_KEYS)}; fix {path}"
        )
    for key in ("name", "base_config", "seeds", "arms"):
        if not raw.get(key):
            raise OptionError(f"grid key {key} must be set; fix {path}")
    fields = settable_fields()
    for where, options in [("common", raw.get("common") or {}), *raw["arms"].items()]:
        bad = sorted(set(options) - set(fields))
        if bad:
            raise OptionError(
                f"grid {where} options ({', '.join(bad)}) must be pretraining options; fix {path}"
            )
    for reserved in (
        "seed",
        "adamoe_data_seed",
        "save",
        "adamoe_metrics_file",
        "tensorboard_dir",
        "adamoe_flops_baseline_topk",
    ):
        if any(reserved in options for options in [raw.get("common") or {}, *raw["arms"].values()]):
            raise OptionError(
                f"grid option {reserved} must not be set; the harness sets it per run"
            )
    grid = Grid(
        name=raw["name"],
        path=path,
        base_config=raw["base_config"],
        nproc=int(raw.get("nproc", 2)),
        seeds=[int(s) for s in raw["seeds"]],
        data_seed=int(raw.get("data_seed", 1234)),
        baseline_topk=int(raw.get("flops_baseline_topk", 2)),
        common=raw.get("common") or {},
        arms=raw["arms"],
        families=raw.get("families") or {},
        description=raw.get("description", ""),
        discussion=raw.get("discussion", ""),
    )
    for arm in grid.arms:  # every arm's options pass the pretraining rules before any run
        try:
            validate(grid.options(arm), check_io=False, check_topology=False)
        except OptionError as error:
            raise OptionError(f"grid arm {arm}: {error}; fix {path}") from None
    if raw.get("reuse"):
        _reuse(grid, raw["reuse"], path)
    if raw.get("continue_from"):
        grid.continued = continued.check(grid, raw["continue_from"], path, load_grid)
    return grid


def _reuse(grid: Grid, reuse: dict, path: str) -> None:
    """``reuse: {grid: OTHER.yaml, arms: [...]}``: those arms of another grid join this one with
    their finished runs, never rerun; each must resolve to the same options and seeds here."""
    if set(reuse) != {"grid", "arms"}:
        raise OptionError(f"reuse ({reuse}) must name grid and arms; fix {path}")
    other = load_grid(os.path.join(REPO, reuse["grid"]))
    for arm in reuse["arms"]:
        if arm not in other.arms or arm in grid.arms:
            raise OptionError(
                f"reuse arm {arm!r} must be an arm of {reuse['grid']} and not one of {path}'s"
            )
        grid.arms[arm] = other.arms[arm]
        grid.reused[arm] = other.name
        if grid.options(arm) != other.options(arm) or (grid.seeds, grid.data_seed) != (
            other.seeds,
            other.data_seed,
        ):
            raise OptionError(
                f"reuse arm {arm!r} must have the same options, seeds and data here as in "
                f"{reuse['grid']}; make base_config, common and seeds match, or run it here"
            )


def run_command(
    grid: Grid,
    arm: str,
    seed: int,
    run_dir: str,
    port: int,
    timing_steps: Optional[int] = None,
    start: Optional[dict] = None,
) -> list[str]:
    """The exact command of one run: the launch script under torchrun, as a user types it.
    ``timing_steps``: a timing run instead (that many steps, no evaluation, no checkpoint).
    ``start``: where a continued arm starts (``load``, ``finetune``)."""
    overrides = {
        **grid.common,
        **grid.arms[arm],
        **(start or {}),
        "seed": seed,
        "adamoe_data_seed": grid.data_seed,
        "save": os.path.join(run_dir, "checkpoints"),
        "adamoe_metrics_file": os.path.join(run_dir, "metrics.jsonl"),
        "tensorboard_dir": os.path.join(run_dir, "tensorboard"),
        "adamoe_flops_baseline_topk": grid.baseline_topk,
    }
    if timing_steps:
        overrides.update(
            train_iters=timing_steps,
            lr_warmup_iters=0,
            eval_interval=None,
            save=None,
            save_interval=None,
            tensorboard_dir=None,
        )
    flags = []
    for key, value in overrides.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else f"--no-{key.replace('_', '-')}")
        elif isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, "null" if value is None else str(value)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(grid.nproc),
        "--master-port",
        str(port),
        LAUNCH,
        "--config",
        grid.base_config,
        *flags,
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _iterations_done(metrics_path: str) -> int:
    try:
        with open(metrics_path) as handle:
            return len(
                {
                    json.loads(line)["iteration"]
                    for line in handle
                    if line.strip() and '"lm loss"' in line
                }
            )
    except (OSError, ValueError):
        return 0


def launch_subprocess(command: list[str], log, poll: Callable[[], None]) -> int:
    """Run one ``run_command`` as a process of its own, output to ``log``, ``poll()`` every 2 s
    while it runs; returns its exit status. (The harness's default launcher; a test hands in
    another that runs the same entry point without starting processes.)"""
    process = subprocess.Popen(
        command,
        cwd=REPO,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    while process.poll() is None:
        try:
            process.wait(timeout=2)  # returns as soon as the run ends
        except subprocess.TimeoutExpired:
            pass
        poll()
    return process.returncode


def run_grid(
    grid: Grid,
    runs_dir: str,
    out_dir: str,
    progress: bool = True,
    launch: Callable = launch_subprocess,
) -> None:
    """Run every missing (arm, seed), refreshing the report after each; progress with ETA.
    ``launch``: how one run is started (``launch_subprocess``)."""
    from tqdm import tqdm

    study_dir = os.path.join(runs_dir, grid.name)
    report_dir = os.path.join(out_dir, grid.name)
    os.makedirs(report_dir, exist_ok=True)
    todo = [  # a run kept in the report is done too (a clone resumes a grid another machine ran)
        (arm, seed)
        for arm, seed in grid.own_runs()
        if not any(
            os.path.isfile(os.path.join(where, grid.run_name(arm, seed), "done.json"))
            for where in (study_dir, grid.keep_dir(out_dir, arm))
        )
    ]
    steps = {arm: grid.options(arm).train_iters for arm in grid.arms}
    bar = tqdm(
        total=sum(steps[arm] for arm, _ in todo),
        unit="it",
        disable=not progress,
        desc=f"{grid.name}: {len(todo)} of {len(grid.runs())} runs to go",
    )
    for number, (arm, seed) in enumerate(todo, 1):
        name = grid.run_name(arm, seed)
        run_dir = os.path.join(study_dir, name)
        os.makedirs(run_dir, exist_ok=True)
        bar.set_postfix_str(f"run {number}/{len(todo)} {name}")
        start = None
        if arm in grid.continued:

            def run_source(other, source_arm, source_seed, source_dir, bar):
                wall = _run_one(other, source_arm, source_seed, source_dir, bar, launch)
                _mark_done(source_dir, wall)

            start = continued.prepare(grid, arm, seed, run_dir, runs_dir, bar, run_source)
        _mark_done(run_dir, _run_one(grid, arm, seed, run_dir, bar, launch, start))
        _keep_in_report(run_dir, os.path.join(report_dir, "runs", name))
        write_report(grid, out_dir)
    bar.close()
    write_report(grid, out_dir)


def _mark_done(run_dir: str, wall: float) -> None:
    with open(os.path.join(run_dir, "done.json"), "w") as handle:
        json.dump(
            {
                "wall_s": wall,
                "finished": datetime.datetime.now().isoformat(timespec="seconds"),
                "commit": _git_commit(),
                "machine": machine(),
            },
            handle,
        )


def _run_one(
    grid: Grid,
    arm: str,
    seed: int,
    run_dir: str,
    bar,
    launch: Callable,
    start: Optional[dict] = None,
) -> float:
    metrics = os.path.join(run_dir, "metrics.jsonl")
    command = run_command(grid, arm, seed, run_dir, _free_port(), start=start)
    attempts_path = os.path.join(run_dir, "attempts.json")
    attempts = json.load(open(attempts_path)) if os.path.isfile(attempts_path) else []
    counted = _iterations_done(metrics)
    bar.update(counted)

    def poll() -> None:
        nonlocal counted
        done = _iterations_done(metrics)
        bar.update(max(0, done - counted))
        counted = max(counted, done)

    started = time.time()
    with open(os.path.join(run_dir, "train.log"), "a") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        returncode = launch(command, log, poll)
    poll()
    attempts.append({"command": command, "wall_s": time.time() - started, "returncode": returncode})
    with open(attempts_path, "w") as handle:
        json.dump(attempts, handle, indent=1)
    if returncode != 0:
        raise RuntimeError(
            f"run {os.path.basename(run_dir)} failed ({returncode}); "
            f"see {os.path.join(run_dir, 'train.log')}; rerun to resume"
        )
    return sum(a["wall_s"] for a in attempts)


def time_arms(
    grid: Grid,
    runs_dir: str,
    out_dir: str,
    steps: int = 40,
    repeats: int = 2,
    launch: Callable = launch_subprocess,
) -> str:
    """A timing pass, for the wall-clock question on a machine doing nothing else: every arm
    (first seed) runs ``steps`` steps, arms alternating, ``repeats`` rounds; the median step time
    (past the first 5 steps) of each run goes to ``<out>/<name>/timing.csv``."""
    rows = []
    for repeat in range(repeats):
        for arm in grid.arms:
            run_dir = os.path.join(runs_dir, grid.name, "timing", f"{arm}-{repeat}")
            shutil.rmtree(run_dir, ignore_errors=True)
            os.makedirs(run_dir)
            command = run_command(grid, arm, grid.seeds[0], run_dir, _free_port(), steps)
            with open(os.path.join(run_dir, "train.log"), "w") as log:
                returncode = launch(command, log, lambda: None)
            if returncode != 0:
                raise RuntimeError(f"timing run {arm} failed; see {run_dir}/train.log")
            times = [s.step_time for s in read_run(run_dir).train[5:] if s.step_time]
            rows.append(
                {"config": arm, "repeat": repeat, "steps": steps, "median_step_s": median(times)}
            )
            print(
                f"timing {arm} (round {repeat + 1}/{repeats}): {median(times):.3f} s/step",
                flush=True,
            )
    path = os.path.join(out_dir, grid.name, "timing.csv")
    with open(path + ".tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=("config", "repeat", "steps", "median_step_s"))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(path + ".tmp", path)
    return path


def read_timing(grid: Grid, out_dir: str) -> dict[str, float]:
    """{arm: median over repeats of the median step time} from timing.csv (empty if none)."""
    path = os.path.join(out_dir, grid.name, "timing.csv")
    if not os.path.isfile(path):
        return {}
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    return {
        arm: median(float(r["median_step_s"]) for r in rows if r["config"] == arm)
        for arm in grid.arms
        if any(r["config"] == arm for r in rows)
    }


def _keep_in_report(run_dir: str, keep_dir: str) -> None:
    """The run's metrics (gzipped) and done.json next to the report, for --report-only."""
    os.makedirs(keep_dir, exist_ok=True)
    with (
        open(os.path.join(run_dir, "metrics.jsonl"), "rb") as source,
        open(os.path.join(keep_dir, "metrics.jsonl.gz.tmp"), "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as target,
    ):  # same bytes each time
        shutil.copyfileobj(source, target)
    os.replace(
        os.path.join(keep_dir, "metrics.jsonl.gz.tmp"), os.path.join(keep_dir, "metrics.jsonl.gz")
    )
    shutil.copyfile(os.path.join(run_dir, "done.json"), os.path.join(keep_dir, "done.json"))


def summarize(grid: Grid, arm: str, seed: int, run: Run, done: dict) -> dict:
    """One results.csv row, from the run's measured records."""
    options = grid.options(arm)
    tail = run.tail(plots.TAIL_FRACTION)
    loads = [s.mean_load for s in tail if s.mean_load is not None]
    flops = [s.flops_vs_topk for s in tail if s.flops_vs_topk is not None]
    times = [s.step_time for s in run.train[5:] if s.step_time]  # past the first steps' warm-up
    steps = run.train[-1].iteration if run.train else 0
    mean_load = fmean(loads) if loads else None
    return {
        "config": arm,
        "seed": seed,
        "n": options.num_experts,
        "m": options.adamoe_num_null_experts,
        "k": options.moe_router_topk,
        "steps": steps,
        "tokens": steps * options.global_batch_size * options.seq_length,
        "final_val_loss": run.validation[-1][1] if run.validation else None,
        "best_val_loss": min(loss for _, loss in run.validation) if run.validation else None,
        "mean_load": mean_load,
        # true experts per token x their width, against top-k of the baseline's experts
        "expert_flops_vs_baseline": None
        if mean_load is None
        else mean_load * expert_width(options) / (grid.baseline_topk * grid.baseline_shape()[1]),
        "model_flops_vs_baseline": fmean(flops) if flops else None,
        "tokens_per_s": (
            options.global_batch_size * options.seq_length / median(times) if times else None
        ),
        "wall_s": done.get("wall_s"),
        "commit": done.get("commit"),
    }


def collect(grid: Grid, out_dir: str) -> tuple[list[dict], list[Run], dict]:
    """Rows and runs of every finished run kept in the report directory."""
    rows, runs, machine_info = [], [], {}
    for arm, seed in grid.runs():
        run_dir = os.path.join(grid.keep_dir(out_dir, arm), grid.run_name(arm, seed))
        if not os.path.isfile(os.path.join(run_dir, "done.json")):
            continue
        with open(os.path.join(run_dir, "done.json")) as handle:
            done = json.load(handle)
        machine_info = done.get("machine", machine_info)
        run = read_run(run_dir, grid.run_name(arm, seed))
        runs.append(run)
        rows.append(summarize(grid, arm, seed, run, done))
    return rows, runs, machine_info


def write_report(grid: Grid, out_dir: str) -> Optional[str]:
    """results.csv, the plots and README.md under ``out_dir/<name>/`` (temp names, renamed)."""
    rows, runs, machine_info = collect(grid, out_dir)
    if not rows:
        return None
    report_dir = os.path.join(out_dir, grid.name)
    _write_csv(rows, os.path.join(report_dir, "results.csv"))
    plots.plot_losses(runs, os.path.join(report_dir, "losses.png"))
    points = [
        {
            "name": arm,
            "family": grid.family(arm),
            "x": [r["expert_flops_vs_baseline"] for r in rows if r["config"] == arm],
            "y": [r["final_val_loss"] for r in rows if r["config"] == arm],
        }
        for arm in grid.arms
        if any(r["config"] == arm for r in rows)
    ]
    plots.plot_frontier(
        points,
        os.path.join(report_dir, "frontier.png"),
        x_label=f"expert FLOPs vs top-{grid.baseline_topk} (measured load / {grid.baseline_topk})",
        title=f"{grid.name}: validation loss vs expert compute",
    )
    plots.plot_layer_load(runs, os.path.join(report_dir, "layer_load.png"))
    adamoe_runs = [run for run, row in zip(runs, rows) if grid.family(row["config"]) != "top-k"]
    if adamoe_runs:
        plots.plot_k_eff(adamoe_runs, os.path.join(report_dir, "k_eff.png"))
    text = report.render(
        grid,
        rows,
        machine_info,
        command=f"python tools/study.py {os.path.relpath(grid.path, REPO)}",
        timing=read_timing(grid, out_dir),
    )
    path = os.path.join(report_dir, "README.md")
    with open(path + ".tmp", "w") as handle:
        handle.write(text)
    os.replace(path + ".tmp", path)
    return path


def _write_csv(rows: list[dict], path: str) -> None:
    with open(path + ".tmp", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {
                    k: (
                        ""
                        if row[k] is None
                        else f"{row[k]:.6g}"
                        if isinstance(row[k], float)
                        else row[k]
                    )
                    for k in CSV_COLUMNS
                }
            )
    os.replace(path + ".tmp", path)


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> dict:
    """What the runs ran on: CPU model and count, Python, torch and megatron-core versions."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next(
                line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": installed("torch"),
        "megatron-core": installed("megatron-core"),
        "platform": platform.platform(),
    }


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, population standard deviation) of the seeds' values."""
    return fmean(values), (pstdev(values) if len(values) > 1 else 0.0)
