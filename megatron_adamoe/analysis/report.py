"""The study README: what ran, on what, the measured table, and comparisons against the top-k
frontier with their seed uncertainty. Numbers only from results rows; the grid file's
``discussion`` (written by a person after reading the results) is quoted as it is.

Statistics, over each arm's seeds: mean and population standard deviation; a difference of means
is given with its standard error sqrt(s_a^2/n_a + s_b^2/n_b) and called larger than the seed
spread when it exceeds twice that (with three seeds an indication, not a formal test).
"""

from __future__ import annotations

import math
from statistics import fmean, pstdev
from typing import Optional

from megatron_adamoe.ops.routing import expected_load

PLOTS = (
    ("losses.png", "Training (smoothed) and validation loss"),
    ("frontier.png", "Validation loss against expert compute: the top-k frontier and AdaMoE"),
    ("layer_load.png", "Load (true experts per token) per MoE layer over training"),
    ("k_eff.png", "Share of tokens using 0..k true experts, per layer, at the end"),
)


def _stats(values: list[float]) -> tuple[float, float, int]:
    values = [v for v in values if v is not None]
    if not values:
        return math.nan, math.nan, 0
    return fmean(values), (pstdev(values) if len(values) > 1 else 0.0), len(values)


def _pm(values: list[float], digits: int = 3) -> str:
    mean, std, count = _stats(values)
    if not count:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if count > 1 else f"{mean:.{digits}f}"


def arm_stats(rows: list[dict], arm: str) -> dict:
    mine = [r for r in rows if r["config"] == arm]
    return {
        key: _stats([r[key] for r in mine])
        for key in (
            "final_val_loss",
            "best_val_loss",
            "mean_load",
            "expert_flops_vs_baseline",
            "model_flops_vs_baseline",
            "tokens_per_s",
        )
    } | {"rows": mine}


def _interpolate(points: list[tuple[float, float]], x: float) -> Optional[float]:
    """Piecewise-linear y(x) through ``points`` (sorted by x); None outside their range."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def topk_arms(grid, stats: dict, group: tuple) -> list[tuple[str, dict]]:
    """The top-k arms with results in comparison ``group`` (``Grid.group``: expert shape, token
    budget, start, balancing), sorted by measured expert FLOPs."""
    arms = [
        (arm, stats[arm])
        for arm in grid.arms
        if arm in stats and grid.is_topk(arm) and grid.group(arm) == group and stats[arm]["rows"]
    ]
    return sorted(arms, key=lambda item: item[1]["expert_flops_vs_baseline"][0])


def frontier(grid, stats: dict, group: tuple) -> list[tuple[str, dict]]:
    """The group's top-k arms that no other dominates (none with fewer expert FLOPs reaches a
    lower mean loss): the frontier is what top-k can do, so an arm that spends more for a higher
    loss is not a point of it."""
    front = []
    for arm, s in topk_arms(grid, stats, group):
        if not front or s["final_val_loss"][0] < front[-1][1]["final_val_loss"][0]:
            front.append((arm, s))
    return front


def dominating(front: list[tuple[str, dict]], point: dict) -> str:
    """The frontier arm that dominates an arm left out of it: the last with no more FLOPs."""
    flops = point["expert_flops_vs_baseline"][0]
    return [arm for arm, s in front if s["expert_flops_vs_baseline"][0] <= flops][-1]


END_TOLERANCE = 0.01  # a measured load within 1 % past the frontier's end counts as at the end


def compare_at_equal_flops(point: dict, front: list[tuple[str, dict]]) -> Optional[dict]:
    """The arm's loss minus the top-k frontier's at the arm's expert FLOPs (interpolated). An
    arm within ``END_TOLERANCE`` past an end (AdaMoE at balanced load 1.0 measures 0.499 of top-2
    where top-1 is 0.500) is compared with that end."""
    xs = [s["expert_flops_vs_baseline"][0] for _, s in front]
    x = point["expert_flops_vs_baseline"][0]
    low, high = min(xs), max(xs)
    if low * (1 - END_TOLERANCE) <= x < low:
        x = low
    elif high < x <= high * (1 + END_TOLERANCE):
        x = high
    mean = _interpolate(list(zip(xs, [s["final_val_loss"][0] for _, s in front])), x)
    if mean is None:
        return None
    std = _interpolate(list(zip(xs, [s["final_val_loss"][1] for _, s in front])), x)
    count = min(s["final_val_loss"][2] for _, s in front)
    a_mean, a_std, a_count = point["final_val_loss"]
    diff = a_mean - mean
    error = math.sqrt(a_std**2 / a_count + std**2 / count)
    # With one seed on either side there is no spread to compare against.
    exceeds = None if min(a_count, count) < 2 else abs(diff) > 2 * error
    return {"topk_loss": mean, "diff": diff, "stderr": error, "exceeds": exceeds}


def flops_at_equal_loss(point: dict, front: list[tuple[str, dict]]) -> tuple[str, Optional[float]]:
    """Expert FLOPs the top-k frontier needs for the arm's loss, as (how, saving fraction)."""
    curve = [(s["final_val_loss"][0], s["expert_flops_vs_baseline"][0]) for _, s in front]
    loss, flops = point["final_val_loss"][0], point["expert_flops_vs_baseline"][0]
    by_loss = sorted(curve)
    if loss < by_loss[0][0]:
        return "below every top-k arm's loss", 1 - flops / max(x for _, x in curve)
    if loss > by_loss[-1][0]:
        return "above every top-k arm's loss", None
    needed = _interpolate(by_loss, loss)
    return "interpolated", 1 - flops / needed


def render(
    grid, rows: list[dict], machine: dict, command: str, timing: Optional[dict] = None
) -> str:
    """The README. ``timing``: {arm: median step seconds} of a quiet timing pass, if any."""
    stats = {arm: arm_stats(rows, arm) for arm in grid.arms}
    stats = {arm: s for arm, s in stats.items() if s["rows"]}
    base = f"top-{grid.baseline_topk}"
    lines = [f"# Study: {grid.name}", ""]
    if grid.description:
        lines += [grid.description.strip(), ""]
    done = len(rows)
    lines += [
        f"{done} of {len(grid.runs())} runs finished ({len(grid.arms)} configs x "
        f"{len(grid.seeds)} seeds). Produced by the study harness from the runs' own "
        "metrics; rebuild this page with the command below plus `--report-only`.",
        "",
    ]
    for other in sorted(set(grid.reused.values())):
        arms = ", ".join(f"`{arm}`" for arm, name in grid.reused.items() if name == other)
        lines += [
            f"Arms {arms} are the runs of the [{other}](../{other}/README.md) grid, reused: the "
            "same options, seeds, data and validation set (checked by the harness), not rerun.",
            "",
        ]
    lines += [
        "## Reproduce",
        "",
        "```bash",
        "make data   # the Shakespeare corpus and tokenizer",
        command,
        "```",
        "",
    ]
    if machine:
        lines += [
            f"Machine: {machine.get('cpu')}, {machine.get('cores')} cores; Python "
            f"{machine.get('python')}, torch {machine.get('torch')}, megatron-core "
            f"{machine.get('megatron-core')}; {machine.get('platform')}.",
            f"Commit(s): {', '.join(sorted({str(r['commit']) for r in rows}))}.",
            "",
        ]
    lines += _setup_lines(grid, rows)
    lines += [
        "## Results",
        "",
        f"Mean ± standard deviation over seeds. Load: true experts per token, mean over "
        f"layers and the last {10}% of steps. Expert FLOPs: load / {grid.baseline_topk} "
        f"(relative to {base}; for experts of another width, load x width / "
        f"({grid.baseline_topk} x {grid.baseline_shape()[1]})). Model FLOPs: the whole forward "
        f"pass at the measured per-layer loads, relative to {base} of the arm's own experts. "
        f"Time/step: relative to {base}'s median step time in its runs.",
        "",
        "| config | n | m | k | balanced load | seeds | final val loss | best val loss | "
        "measured load | expert FLOPs | model FLOPs | tokens/s | time/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    base_tps = stats.get(_arm_with_k(grid, stats, grid.baseline_topk), {}).get("tokens_per_s")
    for arm, s in stats.items():
        row = s["rows"][0]
        balanced = expected_load(row["k"], row["n"], row["m"])
        tps = s["tokens_per_s"]
        relative = f"{base_tps[0] / tps[0]:.3f}" if base_tps and tps[2] else "-"
        lines.append(
            f"| {arm} | {row['n']} | {row['m']} | {row['k']} | {balanced:.2f} | {len(s['rows'])} "
            f"| {_pm([r['final_val_loss'] for r in s['rows']])} "
            f"| {_pm([r['best_val_loss'] for r in s['rows']])} "
            f"| {_pm([r['mean_load'] for r in s['rows']])} "
            f"| {_pm([r['expert_flops_vs_baseline'] for r in s['rows']])} "
            f"| {_pm([r['model_flops_vs_baseline'] for r in s['rows']])} "
            f"| {_pm([r['tokens_per_s'] for r in s['rows']], 0)} | {relative} |"
        )
    lines += [""] + _comparison_lines(grid, stats, base, base_tps)
    lines += _timing_lines(grid, stats, base, timing or {})
    lines += ["## Plots", ""]
    for filename, caption in PLOTS:
        lines += [f"**{caption}**", "", f"![{caption}]({filename})", ""]
    if grid.discussion:
        lines += ["## Discussion", "", grid.discussion.strip(), ""]
    lines += [
        "The per-run rows are in [results.csv](results.csv); each run's metrics in "
        "`runs/<config>-seed<N>/metrics.jsonl.gz`.",
        "",
    ]
    return "\n".join(lines)


def _arm_with_k(grid, stats: dict, k: int) -> Optional[str]:
    """The top-k arm the wall clock is measured against: top-``k`` of the baseline's experts,
    trained as the base config trains (its group) if the grid has one, else of any training."""
    arms = [
        arm
        for arm, s in stats.items()
        if grid.is_topk(arm)
        and grid.expert_shape(arm) == grid.baseline_shape()
        and s["rows"][0]["k"] == k
    ]
    baseline = grid.baseline_group()
    own = [arm for arm in arms if grid.group(arm) == baseline]
    return (own or arms or [None])[0]


def _setup_lines(grid, rows: list[dict]) -> list[str]:
    common = ", ".join(f"`{k}: {v}`" for k, v in grid.common.items())
    arms = "; ".join(
        f"**{arm}** " + (", ".join(f"`{k}: {v}`" for k, v in o.items()) or "-")
        for arm, o in grid.arms.items()
    )
    return [
        "## What ran",
        "",
        f"Every run: the base config `{grid.base_config}` with {common}; data seed "
        f"{grid.data_seed} for every run (the same batches and the same validation set); the "
        f"seed ({', '.join(map(str, grid.seeds))}) sets the initialisation. Arms: {arms}.",
        "",
    ]


def _comparison_lines(grid, stats: dict, base: str, base_tps) -> list[str]:
    fronts = {
        group: frontier(grid, stats, group)
        for group in {grid.group(arm) for arm in stats if not grid.is_topk(arm)}
    }
    others = [(arm, s) for arm, s in stats.items() if not grid.is_topk(arm)]
    if not others or not any(fronts.values()):
        return ["(Comparisons need a top-k arm and another arm with results.)", ""]
    lines = [
        "## Against the top-k frontier",
        "",
        "The top-k arms' (expert FLOPs, validation loss) points, joined by straight lines, "
        "form the frontier; each other arm is compared with the frontier of its own expert "
        "shape (n experts of one FFN width) and training (steps, starting point, aux loss or "
        "expert bias), at its own "
        "measured expert FLOPs (loss "
        "difference; negative = AdaMoE better) and at its own loss (the expert FLOPs top-k "
        "would need, interpolated; saving = 1 - AdaMoE's / top-k's).",
        "",
        "| config | expert FLOPs | loss − top-k loss at equal FLOPs | > 2 s.e.? | "
        "top-k FLOPs at equal loss | FLOPs saved |",
        "|---|---|---|---|---|---|",
    ]
    for arm, s in others:
        front = fronts[grid.group(arm)]
        if len(front) < 2:
            lines.append(_against_one(grid, arm, s, front))
            continue
        at_flops = compare_at_equal_flops(s, front)
        how, saving = flops_at_equal_loss(s, front)
        diff = (
            "outside the frontier's FLOPs range"
            if at_flops is None
            else f"{at_flops['diff']:+.4f} ± {at_flops['stderr']:.4f}"
        )
        exceeds = (
            "-"
            if at_flops is None or at_flops["exceeds"] is None
            else "yes"
            if at_flops["exceeds"]
            else "no"
        )
        saved = "-" if saving is None else f"{saving:+.1%}"
        lines.append(
            f"| {arm} | {s['expert_flops_vs_baseline'][0]:.3f} | {diff} | {exceeds} | "
            f"{how} | {saved} |"
        )
    dominated = [
        (arm, dominating(front, s))
        for group, front in fronts.items()
        for arm, s in topk_arms(grid, stats, group)
        if front and arm not in dict(front)
    ]
    for arm, by in dominated:
        lines.append(
            f"Not on the frontier: {arm} (more expert FLOPs than {by} for a higher mean loss)."
        )
    lines += [""]
    if base_tps:
        lines += [
            "Wall clock in the grid's own runs (the machine may have been shared while they ran; "
            "see the timing pass below when there is one): time per step relative to "
            + base
            + " against model FLOPs relative to "
            + base
            + " (1.0 = time follows FLOPs exactly):",
            "",
        ]
        for arm, s in stats.items():
            flops, tps = s["model_flops_vs_baseline"][0], s["tokens_per_s"]
            if tps[2] and not math.isnan(flops):
                time_ratio = base_tps[0] / tps[0]
                if grid.expert_shape(arm) != grid.baseline_shape():
                    lines.append(f"- {arm}: time {time_ratio:.3f}, {_own_shape(grid, arm)}")
                    continue
                lines.append(
                    f"- {arm}: time {time_ratio:.3f}, model FLOPs {flops:.3f}, "
                    f"time/FLOPs {time_ratio / flops:.3f}"
                )
        lines += [""]
    return lines


def _own_shape(grid, arm: str) -> str:
    """Why an arm of another expert shape has no time/FLOPs ratio: its model FLOPs (the run's
    own measure) are against top-k of its own experts, not the baseline's."""
    n, width = grid.expert_shape(arm)
    return f"model FLOPs against top-{grid.baseline_topk} of its own {n} experts of FFN {width}"


def _against_one(grid, arm: str, s: dict, front: list) -> str:
    """The row of an arm whose group has fewer than two top-k arms: against the one top-k arm
    of its group (e.g. an upcycled model against the same model continued as top-k)."""
    flops = f"{s['expert_flops_vs_baseline'][0]:.3f}"
    if not front:
        n, width, steps, _, balancing = grid.group(arm)
        return (
            f"| {arm} | {flops} | no top-k arm of {n} experts of FFN {width}, {steps} steps, "
            f"{balancing} |"
        )
    name, other = front[0]
    (mean, std, count), (o_mean, o_std, o_count) = s["final_val_loss"], other["final_val_loss"]
    error = math.sqrt(std**2 / count + o_std**2 / o_count)
    exceeds = (
        "-" if min(count, o_count) < 2 else ("yes" if abs(mean - o_mean) > 2 * error else "no")
    )
    return (
        f"| {arm} | {flops} | {mean - o_mean:+.4f} ± {error:.4f} against {name} (the one "
        f"frontier top-k arm of the same training; expert FLOPs "
        f"{other['expert_flops_vs_baseline'][0]:.3f}) | {exceeds} | - | - |"
    )


def _timing_lines(grid, stats: dict, base: str, timing: dict) -> list[str]:
    base_arm = _arm_with_k(grid, stats, grid.baseline_topk)
    if not timing or base_arm not in timing:
        return []
    lines = [
        "## Wall clock, timing pass",
        "",
        "Each config run again for a few steps on a machine doing nothing else, configs "
        "alternating (`--timing`, timing.csv): median step time relative to "
        + base
        + ", against the model FLOPs relative to "
        + base
        + " measured in the grid "
        "(1.0 = time follows FLOPs exactly).",
        "",
        "| config | s/step | time vs " + base + " | model FLOPs vs " + base + " | time / FLOPs |",
        "|---|---|---|---|---|",
    ]
    for arm, seconds in timing.items():
        if arm not in stats:
            continue
        flops = stats[arm]["model_flops_vs_baseline"][0]
        ratio = seconds / timing[base_arm]
        if grid.expert_shape(arm) != grid.baseline_shape():
            lines.append(f"| {arm} | {seconds:.3f} | {ratio:.3f} | {_own_shape(grid, arm)} | - |")
            continue
        lines.append(f"| {arm} | {seconds:.3f} | {ratio:.3f} | {flops:.3f} | {ratio / flops:.3f} |")
    return lines + [""]
