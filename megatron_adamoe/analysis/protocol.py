"""A fine-tuning protocol file (YAML, e.g. ``configs/study/cpu_table1.yaml``): the pretraining
runs that make the bases (an arm and seed of a pretraining study grid, run as that grid runs
it, with optional overrides, e.g. the dense twin), the bases made from them (``export-hf`` of a
checkpoint, or ``add-null-experts`` first), the tasks (a fine-tuning JSONL and an lm-eval task),
optionally a ``validation`` lm-eval perplexity task every run is also scored on,
``adamoe-finetune`` flags common to every arm, the arms (a base plus their own flags;
``method: none`` scores the base as it is, ``topk`` there with another k per token), the seeds
and optionally ``compute_maps`` (a text, a seed and the arms whose runs are mapped).
``load_protocol`` checks it whole, each bad field one line, before anything runs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import yaml

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
    "validation_frontier",
}
COMPUTE_MAP_KEYS = {"text", "seed", "arms"}
BASE_KEYS = {"from", "num_null_experts", "topk", "null_router_init"}
PRETRAIN_KEYS = {"grid", "arm", "seed", "overrides"}
RESERVED = {"model", "data", "output_dir", "checkpoint_dir", "seed", "metrics_file", "resume"}
EVAL_KEYS = {"topk"}  # adamoe-eval's, for method: none arms (the base routed with another k)


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
    validation_frontier: list = dataclasses.field(default_factory=list)

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
        validation_frontier=_validation_frontier(raw, path),
    )


def _validation_frontier(raw: dict, path: str) -> list:
    """Two or more method-none arms (the base at several k) whose validation scores draw the
    line every other arm is measured against."""
    arms = raw.get("validation_frontier") or []
    if not arms:
        return []
    if not raw.get("validation"):
        raise OptionError(f"validation_frontier needs a validation task; set validation in {path}")
    if len(arms) < 2 or any((raw["arms"].get(a) or {}).get("method") != "none" for a in arms):
        raise OptionError(
            f"validation_frontier ({arms}) must name two or more method: none arms (the base "
            f"routed at different k); fix {path}"
        )
    return list(arms)


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
