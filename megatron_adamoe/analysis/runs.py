"""Reading a pretraining run back: its metrics file (JSON lines) or its TensorBoard events.

A run directory holds ``metrics.jsonl`` (``adamoe_metrics_file``, one record per training iteration
and one per validation) and/or ``tensorboard/`` (``tensorboard_dir``). A resumed run appends the
iterations it repeats; the last record of an iteration wins, as the last attempt's is the one the
checkpoints continue from. No torch or Megatron import.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import dataclass, field
from statistics import fmean
from typing import Optional

import yaml

from megatron_adamoe.checkpoint_files import latest_checkpoint
from megatron_adamoe.errors import OptionError

METRICS_FILES = ("metrics.jsonl", "metrics.jsonl.gz")
TENSORBOARD_DIR = "tensorboard"
_LAYER_TAG = re.compile(r"^moe/adamoe/(?P<name>load|k_eff_(?P<j>\d+)_fraction)_layer_(?P<i>\d+)$")


@dataclass
class TrainStep:
    iteration: int
    loss: float
    loads: list[Optional[float]]  # true experts per token, per MoE layer
    k_eff: list[list[Optional[float]]] = field(default_factory=list)  # [layer][j] fractions
    step_time: Optional[float] = None  # seconds
    flops_vs_topk: Optional[float] = None  # whole-model FLOPs over the top-k baseline's

    @property
    def mean_load(self) -> Optional[float]:
        values = [load for load in self.loads if load is not None]
        return fmean(values) if values else None


@dataclass
class Run:
    name: str
    train: list[TrainStep]
    validation: list[tuple[int, float]]  # (iteration, loss)
    options: dict = field(default_factory=dict)  # the resolved config.yaml of its last save

    def tail(self, fraction: float = 0.1) -> list[TrainStep]:
        """The last ``fraction`` of the training steps (at least one)."""
        count = max(1, round(len(self.train) * fraction))
        return self.train[-count:]


def read_run(run_dir: str, name: Optional[str] = None) -> Run:
    """The run in ``run_dir``: its metrics file when there is one, else its TensorBoard events."""
    name = name or os.path.basename(os.path.normpath(run_dir))
    for filename in METRICS_FILES:
        path = os.path.join(run_dir, filename)
        if os.path.isfile(path):
            run = _from_metrics_file(path, name)
            break
    else:
        events = os.path.join(run_dir, TENSORBOARD_DIR)
        if not os.path.isdir(events):
            raise OptionError(
                f"run ({run_dir!r}) must hold {METRICS_FILES[0]} or "
                f"{TENSORBOARD_DIR}/; pass a run directory of the pretraining "
                "entry point"
            )
        run = _from_tensorboard(events, name)
    run.options = _saved_options(os.path.join(run_dir, "checkpoints"))
    return run


def _saved_options(save_dir: str) -> dict:
    """The resolved options next to the run's latest checkpoint, if it kept one."""
    try:
        directory = latest_checkpoint(save_dir) if os.path.isdir(save_dir) else None
    except OptionError:
        return {}
    path = os.path.join(directory, "config.yaml") if directory else None
    if not path or not os.path.isfile(path):
        return {}
    with open(path) as handle:
        return yaml.safe_load(handle) or {}


def _from_metrics_file(path: str, name: str) -> Run:
    opener = gzip.open if path.endswith(".gz") else open
    train: dict[int, TrainStep] = {}
    validation: dict[int, float] = {}
    with opener(path, "rt") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise OptionError(
                    f"{path}:{number} must be a JSON record; the file is damaged "
                    "(a run killed mid-write leaves at most a partial last line)"
                ) from None
            iteration = record["iteration"]
            if "validation lm loss" in record:
                validation[iteration] = record["validation lm loss"]
            elif "lm loss" in record:
                train[iteration] = TrainStep(
                    iteration,
                    record["lm loss"],
                    record.get("load", []),
                    record.get("k_eff", []),
                    record.get("step time"),
                    record.get("flops vs topk"),
                )
    return Run(name, [train[i] for i in sorted(train)], sorted(validation.items()))


def _from_tensorboard(directory: str, name: str) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(directory, size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])

    def series(tag: str) -> dict[int, float]:
        return {e.step: e.value for e in events.Scalars(tag)} if tag in tags else {}

    losses = series("lm loss")
    layers: dict[int, dict[str, dict[int, float]]] = {}
    for tag in tags:
        match = _LAYER_TAG.match(tag)
        if match:
            layers.setdefault(int(match["i"]), {})[match["name"]] = series(tag)
    order = sorted(layers)
    topk = max((int(m["j"]) for m in map(_LAYER_TAG.match, tags) if m and m["j"]), default=-1)
    flops = series("adamoe/flops_vs_topk")
    train = [
        TrainStep(
            step,
            loss,
            [layers[i].get("load", {}).get(step) for i in order],
            [
                [layers[i].get(f"k_eff_{j}_fraction", {}).get(step) for j in range(topk + 1)]
                for i in order
            ],
            None,
            flops.get(step),
        )
        for step, loss in sorted(losses.items())
    ]
    return Run(name, train, sorted(series("lm loss validation").items()))
