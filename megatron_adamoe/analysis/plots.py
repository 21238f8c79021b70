"""PNG charts of pretraining runs (matplotlib, Agg backend): losses, the compute/quality frontier,
per-layer load over training and the final k_eff histogram per layer.

Runs named ``<config>-seed<N>`` form one group per config: a chart draws the mean over a group's
seeds (and its min..max band where there are several), so a study reads as one line per config.
"""

from __future__ import annotations

import os
import re
from collections import defaultdict
from statistics import fmean, pstdev
from typing import Iterable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from megatron_adamoe.analysis.runs import Run  # noqa: E402

_SEED_SUFFIX = re.compile(r"-seed\d+$")
TAIL_FRACTION = 0.1  # the end-of-training window that "final" load and k_eff average over


def group_name(run_name: str) -> str:
    return _SEED_SUFFIX.sub("", run_name)


def group_runs(runs: Iterable[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        groups[group_name(run.name)].append(run)
    return dict(groups)


def _colors(names: list[str]) -> dict[str, tuple]:
    palette = plt.get_cmap("tab10")
    return {name: palette(i % 10) for i, name in enumerate(names)}


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points (the start uses what it has)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def _mean_band(
    series: list[dict[int, float]],
) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps present in every series, with the mean, min and max over the series."""
    steps = sorted(set.intersection(*(set(s) for s in series)))
    values = [[s[step] for s in series] for step in steps]
    return (steps, [fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values])


def _draw(
    axis,
    series: list[dict[int, float]],
    color,
    label: str,
    smooth: int = 1,
    marker: Optional[str] = None,
) -> None:
    steps, mean, low, high = _mean_band(series)
    if not steps:
        return
    if smooth > 1:
        mean, low, high = (_smooth(v, smooth) for v in (mean, low, high))
    axis.plot(steps, mean, color=color, label=label, marker=marker, markersize=3, linewidth=1.4)
    if len(series) > 1:
        axis.fill_between(steps, low, high, color=color, alpha=0.15, linewidth=0)


def plot_losses(runs: list[Run], path: str) -> None:
    """Training loss (smoothed) and validation loss of every group, on two panels."""
    groups = group_runs(runs)
    colors = _colors(list(groups))
    figure, (train_axis, valid_axis) = plt.subplots(1, 2, figsize=(13, 5))
    for name, members in groups.items():
        train = [{s.iteration: s.loss for s in run.train} for run in members]
        smooth = max(1, min(len(s) for s in train) // 40)
        _draw(train_axis, train, colors[name], name, smooth=smooth)
        valid = [dict(run.validation) for run in members if run.validation]
        if valid:
            _draw(valid_axis, valid, colors[name], name, marker="o")
    seeds = {len(members) for members in groups.values()}
    band = " (mean over seeds, band: min..max)" if max(seeds) > 1 else ""
    train_axis.set(title=f"training loss, smoothed{band}", xlabel="iteration", ylabel="lm loss")
    valid_axis.set(title=f"validation loss{band}", xlabel="iteration", ylabel="lm loss")
    for axis in (train_axis, valid_axis):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    _save(figure, path)


def plot_frontier(points: list[dict], path: str, x_label: str, title: str) -> None:
    """Validation loss against compute, one point per config with seed error bars.

    ``points``: dicts with ``name``, ``family`` (a legend entry: configs of one family are joined
    by a line, in x order), ``x``, ``y`` (lists over seeds).
    """
    families: dict[str, list[dict]] = defaultdict(list)
    for point in points:
        families[point["family"]].append(point)
    colors = _colors(list(families))
    figure, axis = plt.subplots(figsize=(8, 5.5))
    for family, members in families.items():
        members = sorted(members, key=lambda p: fmean(p["x"]))
        xs = [fmean(p["x"]) for p in members]
        ys = [fmean(p["y"]) for p in members]
        axis.errorbar(
            xs,
            ys,
            xerr=[pstdev(p["x"]) for p in members],
            yerr=[pstdev(p["y"]) for p in members],
            color=colors[family],
            marker="o",
            capsize=4,
            linewidth=1.2,
            label=family,
        )
        for point, x, y in zip(members, xs, ys):
            axis.annotate(
                point["name"],
                (x, y),
                textcoords="offset points",
                xytext=(6, 6),
                fontsize=8,
                color=colors[family],
            )
    axis.set(title=title, xlabel=x_label, ylabel="final validation loss (mean ± std over seeds)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=9)
    _save(figure, path)


def plot_layer_load(runs: list[Run], path: str) -> None:
    """True experts per token in each MoE layer over training (one panel per layer)."""
    groups = group_runs(runs)
    colors = _colors(list(groups))
    num_layers = max(len(step.loads) for run in runs for step in run.train[:1])
    figure, axes = plt.subplots(
        1, num_layers, figsize=(4 * num_layers, 4), sharey=True, squeeze=False
    )
    for layer, axis in enumerate(axes[0]):
        for name, members in groups.items():
            series = [
                {
                    s.iteration: s.loads[layer]
                    for s in run.train
                    if layer < len(s.loads) and s.loads[layer] is not None
                }
                for run in members
            ]
            smooth = max(1, min(len(s) for s in series) // 40)
            _draw(axis, series, colors[name], name, smooth=smooth)
        axis.set(title=f"MoE layer {layer}", xlabel="iteration")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("load (true experts per token)")
    axes[0][-1].legend(fontsize=8)
    _save(figure, path)


def final_k_eff(run: Run, fraction: float = TAIL_FRACTION) -> list[list[float]]:
    """[layer][j]: fraction of tokens using j true experts, averaged over the last steps."""
    tail = [step.k_eff for step in run.tail(fraction) if step.k_eff]
    if not tail:
        return []
    return [
        [
            fmean(step[layer][j] for step in tail if step[layer][j] is not None)
            for j in range(len(tail[0][layer]))
        ]
        for layer in range(len(tail[0]))
    ]


def plot_k_eff(runs: list[Run], path: str) -> None:
    """Per MoE layer, the share of tokens that use 0, 1, ..., k true experts at the end of
    training (mean over a group's seeds), one bar per group."""
    groups = {
        name: [final_k_eff(run) for run in members] for name, members in group_runs(runs).items()
    }
    groups = {name: hists for name, hists in groups.items() if all(hists)}
    if not groups:
        raise ValueError("no run has k_eff records (AdaMoE metrics); nothing to plot")
    colors = _colors(list(groups))
    num_layers = max(len(hists[0]) for hists in groups.values())
    max_k = max(len(hists[0][0]) for hists in groups.values())
    figure, axes = plt.subplots(
        1, num_layers, figsize=(4 * num_layers, 4), sharey=True, squeeze=False
    )
    width = 0.8 / len(groups)
    for layer, axis in enumerate(axes[0]):
        for g, (name, hists) in enumerate(groups.items()):
            values = [
                fmean(h[layer][j] for h in hists) if j < len(hists[0][layer]) else 0.0
                for j in range(max_k)
            ]
            positions = [j - 0.4 + width * (g + 0.5) for j in range(max_k)]
            axis.bar(positions, values, width=width, color=colors[name], label=name)
        axis.set(
            title=f"MoE layer {layer}", xlabel="true experts used (k_eff)", xticks=range(max_k)
        )
        axis.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel(f"fraction of tokens (last {TAIL_FRACTION:.0%} of steps)")
    axes[0][-1].legend(fontsize=8)
    _save(figure, path)


def frontier_points(runs: list[Run], baseline_topk: int) -> list[dict]:
    """One point per group: expert FLOPs (final load / baseline k) and final validation loss of
    each seed; the family from the saved options (null experts or not) when the runs kept them."""
    points = []
    for name, members in group_runs(runs).items():
        members = [run for run in members if run.validation and run.train]
        loads = [[s.mean_load for s in run.tail() if s.mean_load is not None] for run in members]
        if not members or not all(loads):
            continue
        nulls = {run.options.get("adamoe_num_null_experts") for run in members}
        family = "runs" if None in nulls else "top-k (m = 0)" if nulls == {0} else "AdaMoE (m > 0)"
        points.append(
            {
                "name": name,
                "family": family,
                "x": [fmean(values) / baseline_topk for values in loads],
                "y": [run.validation[-1][1] for run in members],
            }
        )
    return points


def plot_all(runs: list[Run], out_dir: str, baseline_topk: int = 2) -> list[str]:
    """Every chart the runs have data for, as PNG files in ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = []

    def target(filename: str) -> str:
        written.append(os.path.join(out_dir, filename))
        return written[-1]

    plot_losses(runs, target("losses.png"))
    if any(step.loads for run in runs for step in run.train[:1]):
        plot_layer_load(runs, target("layer_load.png"))
    if any(step.k_eff for run in runs for step in run.train[-1:]):
        plot_k_eff([run for run in runs if run.train and run.train[-1].k_eff], target("k_eff.png"))
    points = frontier_points(runs, baseline_topk)
    if points:
        plot_frontier(
            points,
            target("frontier.png"),
            x_label=f"expert FLOPs vs top-{baseline_topk} (measured load / {baseline_topk})",
            title="validation loss vs expert compute",
        )
    return written


def _save(figure, path: str) -> None:
    figure.tight_layout()
    temporary = f"{path}.tmp.png"
    figure.savefig(temporary, dpi=110)
    plt.close(figure)
    os.replace(temporary, path)
