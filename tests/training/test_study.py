"""The study harness end to end: a 2-config x 1-seed grid of a few steps on the synthetic corpus,
through the real entry point; the CSV's content against the runs' own metrics, the plots, the
README, resuming a run, and rebuilding the report from the kept files alone.

The grid's runs go through the harness with a launcher that hands each run's command (the
launch script under torchrun, as ``run_command`` writes it) to the rank pool instead of starting
torchrun (tests/training/test_launch.py runs that command line itself); the report is rebuilt
by tools/study.py in a process of its own."""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.runs import REPO, SMALL_MODEL, rank_pool

pytestmark = pytest.mark.distributed


def _grid(tmp_path, corpus) -> str:
    data_path, tokenizer = corpus
    grid = {
        "name": "tiny",
        "base_config": "configs/cpu_adamoe_tiny.yaml",
        "nproc": 2,
        "seeds": [7],
        "data_seed": 3,
        "flops_baseline_topk": 2,
        "common": {
            **{k: v for k, v in SMALL_MODEL.items() if k != "tensorboard_dir"},  # set per run
            "data_path": [data_path],
            "tokenizer_model": tokenizer,
            "train_iters": 6,
            "lr_warmup_iters": 1,
            "eval_interval": 3,
            "eval_iters": 1,
            "save_interval": 3,
            "log_interval": 3,
            "hidden_dropout": 0.0,
            "attention_dropout": 0.0,
            "moe_aux_loss_coeff": 0.01,
            "adamoe_aux_loss_coeff_schedule": None,
        },
        "arms": {
            "top2": {"moe_router_topk": 2, "adamoe_num_null_experts": 0},
            "ada": {"moe_router_topk": 3, "adamoe_num_null_experts": 4},
        },
        "discussion": "Written by a person after reading the results.",
    }
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid, sort_keys=False))  # arms in the written order
    return str(path)


def _study(*args, check=True):
    result = subprocess.run(
        [sys.executable, "tools/study.py", *args, "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def _pool_launch(command, log, poll) -> int:
    """A run of ``study.run_command`` on the rank pool: the launch script's arguments, the same
    number of ranks; the ranks' output goes to the run's log."""
    from megatron_adamoe.analysis.study import LAUNCH

    argv = command[command.index(LAUNCH) + 1 :]
    nproc = int(command[command.index("--nproc-per-node") + 1])
    result = rank_pool().run(argv, nproc=nproc)
    log.write(result.stdout + result.stderr)
    return result.returncode


def _run_grid(grid_path, runs, out, **timing):
    from megatron_adamoe.analysis import study
    from megatron_adamoe.analysis.grid import load_grid

    grid = load_grid(grid_path)
    if timing:
        study.time_arms(grid, str(runs), str(out), launch=_pool_launch, **timing)
    else:
        study.run_grid(grid, str(runs), str(out), progress=False, launch=_pool_launch)
    study.write_report(grid, str(out))


def test_study_harness_runs_a_grid_and_reports_it(synthetic_corpus, tmp_path):
    grid = _grid(tmp_path, synthetic_corpus)
    runs, out = tmp_path / "runs", tmp_path / "docs"
    _run_grid(grid, runs, out)
    report = out / "tiny"
    with open(report / "results.csv") as handle:
        rows = {row["config"]: row for row in csv.DictReader(handle)}
    assert sorted(rows) == ["ada", "top2"]
    for name, row in rows.items():
        metrics = [
            json.loads(line)
            for line in gzip.open(report / "runs" / f"{name}-seed7" / "metrics.jsonl.gz", "rt")
        ]
        train = [r for r in metrics if "lm loss" in r]
        validation = [r["validation lm loss"] for r in metrics if "validation lm loss" in r]
        assert (row["seed"], row["steps"], row["tokens"]) == ("7", "6", str(6 * 8 * 64))
        assert float(row["final_val_loss"]) == pytest.approx(validation[-1], rel=1e-5)
        assert float(row["best_val_loss"]) == pytest.approx(min(validation), rel=1e-5)
        last_load = sum(train[-1]["load"]) / len(train[-1]["load"])
        assert float(row["mean_load"]) == pytest.approx(last_load, rel=1e-5)  # tail = 1 step
        assert float(row["expert_flops_vs_baseline"]) == pytest.approx(last_load / 2, rel=1e-5)
        assert float(row["tokens_per_s"]) > 0 and float(row["wall_s"]) > 0
    assert (rows["top2"]["n"], rows["top2"]["m"], rows["top2"]["k"]) == ("4", "0", "2")
    assert (rows["ada"]["n"], rows["ada"]["m"], rows["ada"]["k"]) == ("4", "4", "3")
    assert float(rows["top2"]["mean_load"]) == 2.0  # stock top-2: always two true experts
    assert float(rows["top2"]["model_flops_vs_baseline"]) == pytest.approx(1.0)
    assert 0 <= float(rows["ada"]["mean_load"]) <= 3
    text = (report / "README.md").read_text()
    assert "2 of 2 runs finished" in text and "python tools/study.py" in text
    assert "| top2 | 4 | 0 | 2 | 2.00 | 1 |" in text and "| ada | 4 | 4 | 3 | 1.50 | 1 |" in text
    assert "Written by a person after reading the results." in text
    for png in ("losses.png", "frontier.png", "layer_load.png", "k_eff.png"):
        assert (report / png).stat().st_size > 5000, png
    assert not list(report.glob("*.tmp*"))

    # A run that stopped before its done.json resumes from its own checkpoint; the rest is kept.
    os.remove(runs / "tiny" / "ada-seed7" / "done.json")
    shutil.rmtree(report / "runs" / "ada-seed7")  # kept only once done
    _run_grid(grid, runs, out)
    log = (runs / "tiny" / "ada-seed7" / "train.log").read_text()
    assert "resuming at iteration 6" in log
    attempts = json.loads((runs / "tiny" / "ada-seed7" / "attempts.json").read_text())
    assert [a["returncode"] for a in attempts] == [0, 0]
    assert len(json.loads((runs / "tiny" / "top2-seed7" / "attempts.json").read_text())) == 1

    # The timing pass: each config again, alternating, a few steps; the report shows it.
    _run_grid(grid, runs, out, steps=8)
    with open(report / "timing.csv") as handle:
        timing = list(csv.DictReader(handle))
    assert [(r["config"], r["repeat"]) for r in timing] == [
        ("top2", "0"),
        ("ada", "0"),
        ("top2", "1"),
        ("ada", "1"),
    ]
    assert all(float(r["median_step_s"]) > 0 for r in timing)
    text = (report / "README.md").read_text()
    assert (
        "## Wall clock, timing pass" in text
        and "| ada | " in text.split("## Wall clock, timing pass")[1]
    )

    # The report rebuilds from the kept files alone.
    before = (report / "results.csv").read_text()
    (report / "results.csv").unlink()
    _study(grid, "--out", str(out), "--runs-dir", str(tmp_path / "nowhere"), "--report-only")
    assert (report / "results.csv").read_text() == before

    # A clone has the kept runs but no work directory: nothing is rerun.
    _run_grid(grid, tmp_path / "clone-runs", out)
    assert not (tmp_path / "clone-runs" / "tiny" / "top2-seed7").exists()
    _check_second_grid(tmp_path, grid, runs, out)


def _check_second_grid(tmp_path, grid_path, runs, out):
    """A second grid reusing the first grid's top2 runs (read from the first grid's report, not
    rerun) and upcycling them (each seed's top2 checkpoint through add-null-experts, then a few
    steps from it); an arm whose options differ from the reused grid's is refused in one line."""
    from megatron_adamoe.analysis import study
    from megatron_adamoe.analysis.grid import load_grid
    from megatron_adamoe.errors import OptionError

    raw = yaml.safe_load(open(grid_path))
    upcycled = {**raw["arms"]["ada"], "train_iters": 2, "eval_interval": 2, "save_interval": 2}
    second = {**raw, "name": "tiny2", "arms": {"ada": raw["arms"]["ada"], "up": upcycled}}
    second["reuse"] = {"grid": grid_path, "arms": ["top2"]}
    convert = {"num_null_experts": 4, "topk": 3, "null_router_init": "tile"}
    second["continue_from"] = {
        "up": {"grid": grid_path, "arm": "top2", "add_null_experts": convert}
    }
    path = tmp_path / "grid2.yaml"
    path.write_text(yaml.safe_dump(second, sort_keys=False))
    grid = load_grid(str(path))
    assert grid.reused == {"top2": "tiny"} and grid.own_runs() == [("ada", 7), ("up", 7)]
    kept = out / "tiny2" / "runs" / "ada-seed7"  # as if this grid had run its own arm
    kept.mkdir(parents=True)
    for name in ("done.json", "metrics.jsonl.gz"):
        (kept / name).write_bytes((out / "tiny" / "runs" / "ada-seed7" / name).read_bytes())
    study.run_grid(grid, str(runs), str(out), progress=False, launch=_pool_launch)
    with open(out / "tiny2" / "results.csv") as handle:
        rows = list(csv.DictReader(handle))
    first = (out / "tiny" / "results.csv").read_text().splitlines()
    assert [r["config"] for r in rows] == ["ada", "up", "top2"]
    assert (out / "tiny2" / "results.csv").read_text().splitlines()[3] in first
    text = (out / "tiny2" / "README.md").read_text()
    assert "Arms `top2` are the runs of the [tiny](../tiny/README.md) grid, reused" in text
    # The upcycled run: converted from tiny's top2 (not rerun), then 2 steps from step 0.
    assert len(json.loads((runs / "tiny" / "top2-seed7" / "attempts.json").read_text())) == 1
    log = (runs / "tiny2" / "up-seed7" / "convert.log").read_text()
    assert "add-null-experts --load " + str(runs / "tiny" / "top2-seed7" / "checkpoints") in log
    command = json.loads((runs / "tiny2" / "up-seed7" / "attempts.json").read_text())[0]["command"]
    assert command[command.index("--load") + 1] == str(runs / "tiny2" / "up-seed7" / "converted")
    assert "--finetune" in command and rows[1]["steps"] == "2"
    assert "| up | " in text.split("## Against the top-k frontier")[1]
    second["common"] = {**raw["common"], "lr": 1.0}
    path.write_text(yaml.safe_dump(second, sort_keys=False))
    with pytest.raises(OptionError, match="reuse arm 'top2' must have the same options"):
        load_grid(str(path))


def test_study_rejects_a_bad_grid_with_one_line(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "name": "x",
                "base_config": "configs/cpu_adamoe_tiny.yaml",
                "seeds": [1],
                "arms": {"a": {"moe_router_top_k": 2}},
            }
        )
    )
    result = _study(str(path), "--report-only", check=False)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"error: grid a options (moe_router_top_k) must be pretraining options; fix {path}"
    )
