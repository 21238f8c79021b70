"""A reproducible study: a grid of configs x seeds through the real pretraining entry point.

A grid (``analysis.grid``: a YAML file such as ``configs/study/cpu_shakespeare.yaml``, its arms,
seeds and one data seed) is run by ``run_grid``, which runs what is missing: a finished run has
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
from statistics import fmean, median, pstdev
from typing import Callable, Optional

from megatron_adamoe.analysis import continued, plots, report
from megatron_adamoe.analysis.grid import REPO, Grid, expert_width
from megatron_adamoe.analysis.runs import Run, read_run

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
