"""A study grid: a YAML file (e.g. ``configs/study/cpu_shakespeare.yaml``) naming a base config,
options common to every arm (data, tokens, optimizer, schedule, validation: only routing may
differ between arms), the arms, the seeds and one data seed (every run reads the same batches
and the same validation set; seeds change the initialisation only); arms reused from another
grid and arms continued from another grid's checkpoints. ``load_grid`` checks it whole (every
arm against the pretraining rules) before anything runs; ``analysis.study`` runs and reports it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import yaml

from megatron_adamoe.analysis import continued
from megatron_adamoe.errors import OptionError
from megatron_adamoe.options import PretrainArguments, settable_fields
from megatron_adamoe.options.rules import validate

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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

    def baseline_group(self) -> tuple:
        """The group of the base config with the common options (no arm's own): the training
        the FLOPs baseline's top-k arm has, e.g. the aux loss rather than the expert bias."""
        return self.group(None)

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
