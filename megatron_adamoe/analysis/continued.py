"""Grid arms that continue another grid's finished runs (upcycling a pretrained top-k model).

A grid's ``continue_from`` maps such an arm to the run it starts from, seed for seed:

    continue_from:
      top2-continued: {grid: configs/study/cpu_shakespeare.yaml, arm: top2}
      upcycled-k3-m4:
        grid: configs/study/cpu_shakespeare.yaml
        arm: top2
        add_null_experts: {num_null_experts: 4, topk: 3, null_router_init: tile, target_load: 1.5}

Each run loads the source run's final checkpoint with ``finetune: true`` (weights only, step 0,
a fresh optimizer), after ``adamoe-convert add-null-experts`` when asked, as a user types them.
A source run that is missing is made first, exactly as its own grid makes it (its kept report
files are not touched).
"""

from __future__ import annotations

import os
import subprocess
import sys

from megatron_adamoe.errors import OptionError

SOURCE_KEYS = {"grid", "arm", "add_null_experts"}
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONVERT_KEYS = {"num_null_experts", "topk", "null_router_init", "target_load", "null_bias"}


def check(grid, continue_from: dict, path: str, load_grid) -> dict:
    """The validated ``continue_from`` mapping of ``grid`` (arm -> source), with each source
    grid loaded (``load_grid``)."""
    checked = {}
    for arm, source in continue_from.items():
        keys = set(source) if isinstance(source, dict) else set()
        if arm not in grid.arms or not {"grid", "arm"} <= keys <= SOURCE_KEYS:
            raise OptionError(
                f"continue_from.{arm} ({source}) must name an arm of this grid and the grid and "
                f"arm it continues (add_null_experts optional); fix {path}"
            )
        other = load_grid(os.path.join(REPO, source["grid"]))
        if source["arm"] not in other.arms or not set(grid.seeds) <= set(other.seeds):
            raise OptionError(
                f"continue_from.{arm}: {source['arm']!r} must be an arm of {source['grid']} run "
                f"with this grid's seeds ({grid.seeds})"
            )
        convert = source.get("add_null_experts") or {}
        bad = sorted(set(convert) - CONVERT_KEYS)
        if bad:
            raise OptionError(
                f"continue_from.{arm}.add_null_experts keys ({', '.join(bad)}) must be among "
                f"{sorted(CONVERT_KEYS)} (add-null-experts' flags)"
            )
        options, before = grid.options(arm), other.options(source["arm"])
        want = (
            convert.get("num_null_experts", before.adamoe_num_null_experts),
            convert.get("topk", before.moe_router_topk),
        )
        if (options.adamoe_num_null_experts, options.moe_router_topk) != want:
            raise OptionError(
                f"continue_from.{arm}: the arm's m and k ({options.adamoe_num_null_experts}, "
                f"{options.moe_router_topk}) must be the checkpoint's after conversion {want}"
            )
        checked[arm] = {**source, "source_grid": other}
    return checked


def prepare(grid, arm: str, seed: int, run_dir: str, runs_dir: str, bar, run_source) -> dict:
    """The checkpoint the run starts from (the source run made first if missing, converted when
    asked) as the run's ``load`` and ``finetune`` options."""
    source = grid.continued[arm]
    other = source["source_grid"]
    source_dir = os.path.join(runs_dir, other.name, other.run_name(source["arm"], seed))
    if not os.path.isfile(os.path.join(source_dir, "done.json")):
        os.makedirs(source_dir, exist_ok=True)
        run_source(other, source["arm"], seed, source_dir, bar)
    checkpoints = os.path.join(source_dir, "checkpoints")
    convert = source.get("add_null_experts")
    if not convert:
        return {"load": checkpoints, "finetune": True}
    converted = os.path.join(run_dir, "converted")
    if not os.path.isdir(converted):  # add-null-experts writes next to --out and renames
        flags = []
        for key, value in convert.items():
            flags += ["--" + key.replace("_", "-"), str(value)]
        command = [
            sys.executable,
            os.path.join(REPO, "tools/convert_checkpoint.py"),
            "add-null-experts",
            "--load",
            checkpoints,
            "--out",
            converted,
            *flags,
        ]
        with open(os.path.join(run_dir, "convert.log"), "a") as log:
            log.write(f"$ {' '.join(command)}\n")
            log.flush()
            result = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            raise RuntimeError(f"add-null-experts failed; see {run_dir}/convert.log")
    return {"load": converted, "finetune": True}
