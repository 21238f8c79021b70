"""The fine-tuning protocol's report: the table in the paper's Table 1 layout (per task: accuracy
mean ± standard deviation over seeds, Load, %FLOPs against the top-k baseline), the
accuracy-against-FLOPs plot and, with a validation text, bits per byte against FLOPs, from the
rows ``finetune_study.collect`` reads off the runs."""

from __future__ import annotations

import os
from statistics import fmean, pstdev

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _values(rows: list[dict], arm: str, task: str, key: str) -> list[float]:
    return [
        r[key] for r in rows if r["arm"] == arm and r["task"] == task and r.get(key) is not None
    ]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return fmean(values), (pstdev(values) if len(values) > 1 else 0.0)


def _cells(rows: list[dict], arm: str, task: str) -> list[str]:
    acc = _values(rows, arm, task, "acc")
    if not acc:
        return ["-", "-", "-"]
    mean, std = _mean_std([100 * a for a in acc])
    load = _values(rows, arm, task, "load_mean")
    flops = _values(rows, arm, task, "model_flops_pct")
    return [
        f"{mean:.1f} ± {std:.1f} ({len(acc)})",
        f"{fmean(load):.2f}" if load else "-",
        f"{fmean(flops):+.1f}" if flops else "-",
    ]


def table(protocol, rows: list[dict]) -> list[str]:
    """Markdown: one row per arm; per task and on average Acc. (%, mean ± std (seeds)), Load
    (true experts per token, mean over layers) and %FLOPs (whole model against top-k)."""
    tasks = list(protocol.tasks)
    header = ["Arm"] + [f"{t} {c}" for t in [*tasks, "Avg."] for c in ("Acc.", "Load", "%FLOPs")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in protocol.arms:
        cells = [arm]
        for task in tasks:
            cells += _cells(rows, arm, task)
        means = [_seed_mean_over_tasks(rows, arm, tasks, k) for k in ("acc", "load_mean")]
        flops = _seed_mean_over_tasks(rows, arm, tasks, "model_flops_pct")
        cells += [
            "-" if means[0] is None else f"{100 * means[0]:.1f}",
            "-" if means[1] is None else f"{means[1]:.2f}",
            "-" if flops is None else f"{flops:+.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def validation_table(protocol, rows: list[dict]) -> list[str]:
    """Markdown: one row per arm; per task (the model fine-tuned on that task; a base arm's is
    the same model for every task) bits per byte on the validation text, mean ± std over seeds
    (number), and Load and %FLOPs measured there."""
    tasks = list(protocol.tasks)
    header = ["Arm"] + [f"{t} {c}" for t in tasks for c in ("Bits/byte", "Load", "%FLOPs")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in protocol.arms:
        cells = [arm]
        for task in tasks:
            runs = _val_runs(rows, arm, task)
            if not runs:
                cells += ["-", "-", "-"]
                continue
            bits, spread = _mean_std([r["val_bits_per_byte"] for r in runs])
            cells += [
                f"{bits:.4f} ± {spread:.4f} ({len(runs)})",
                f"{fmean(r['val_load_mean'] for r in runs):.2f}",
                f"{fmean(r['val_model_flops_pct'] for r in runs):+.1f}",
            ]
        if any(cell != "-" for cell in cells[1:]):
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _val_runs(rows: list[dict], arm: str, task: str) -> list[dict]:
    return [r for r in rows if r["arm"] == arm and r["task"] == task and _has_val(r)]


def frontier_table(protocol, rows: list[dict]) -> list[str]:
    """Markdown: per arm and task, the runs' validation bits per byte minus the frontier's at
    their FLOPs (the straight line between the neighbouring frontier arms' means), mean ± std
    over seeds and how many runs lie below; '-' outside the frontier's FLOPs range."""
    points = []
    for arm in protocol.validation_frontier:
        runs = [r for r in rows if r["arm"] == arm and _has_val(r)]
        if not runs:
            return []
        points.append(
            (
                fmean(r["val_model_flops_pct"] for r in runs),
                fmean(r["val_bits_per_byte"] for r in runs),
            )
        )
    points.sort()

    def line(x):
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if x0 <= x <= x1:
                return y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else min(y0, y1)
        return None

    tasks = list(protocol.tasks)
    header = ["Arm"] + [f"{t} {c}" for t in tasks for c in ("%FLOPs", "− frontier", "below")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in protocol.arms:
        if arm in protocol.validation_frontier or not any(_val_runs(rows, arm, t) for t in tasks):
            continue
        cells = [arm]
        for task in tasks:
            runs = _val_runs(rows, arm, task)
            flops = [r["val_model_flops_pct"] for r in runs]
            gaps = [r["val_bits_per_byte"] - line(x) for r, x in zip(runs, flops)
                    if line(x) is not None]  # fmt: skip
            if not runs:
                cells += ["-", "-", "-"]
            elif len(gaps) < len(runs):
                cells += [f"{fmean(flops):+.1f}", "outside the frontier's range", "-"]
            else:
                gap, spread = _mean_std(gaps)
                below = sum(g < 0 for g in gaps)
                cells += [
                    f"{fmean(flops):+.1f}",
                    f"{gap:+.4f} ± {spread:.4f}",
                    f"{below}/{len(gaps)}",
                ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _has_val(row: dict) -> bool:
    return row.get("val_bits_per_byte") is not None


def write_validation_plot(protocol, rows: list[dict], path: str) -> None:
    """Bits per byte on the validation text against whole-model FLOPs there, mean ± std per arm
    over its runs."""
    figure, axis = plt.subplots(figsize=(6.5, 4.6))
    colors = plt.get_cmap("tab20")
    for number, arm in enumerate(protocol.arms):
        runs = [r for r in rows if r["arm"] == arm and _has_val(r)]
        if not runs:
            continue
        (y, y_std), (x, x_std) = (
            _mean_std([r[key] for r in runs])
            for key in ("val_bits_per_byte", "val_model_flops_pct")
        )
        axis.errorbar(
            x, y, yerr=y_std, xerr=x_std, fmt="o", capsize=3, color=colors(number % 20), label=arm
        )
    frontier = [
        [r for r in rows if r["arm"] == arm and _has_val(r)] for arm in protocol.validation_frontier
    ]
    if frontier and all(frontier):
        points = sorted(
            (
                fmean(r["val_model_flops_pct"] for r in runs),
                fmean(r["val_bits_per_byte"] for r in runs),
            )
            for runs in frontier
        )
        axis.plot(*zip(*points), "--", color="grey", lw=1, label="frontier")
    axis.set_xlabel(f"model FLOPs per token vs top-{protocol.baseline_topk} (%)")
    axis.set_ylabel(f"bits per byte ({protocol.validation})")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="best")
    axis.set_title(f"{protocol.name}: validation loss against compute (mean ± std over runs)")
    figure.tight_layout()
    figure.savefig(path + ".tmp.png", dpi=110)
    plt.close(figure)
    os.replace(path + ".tmp.png", path)


def compute_map_table(protocol, rows: list[dict]) -> list[str]:
    """Markdown: per mapped arm, true experts per token on the map's text (mean over its maps):
    overall, by MoE layer, by token class and by frequency quartile (Q1 rarest)."""
    maps = {arm: [r["compute_map"] for r in rows if r["arm"] == arm and r.get("compute_map")]
            for arm in protocol.compute_maps.get("arms", [])}  # fmt: skip
    maps = {arm: found for arm, found in maps.items() if found}
    if not maps:
        return []
    first = next(iter(maps.values()))[0]
    layers = list(first["by_layer"])
    classes = list(first["by_class"])
    quartiles = list(first["by_frequency"])
    header = ["Arm", "maps", "mean"] + [f"layer {i}" for i in layers] + classes + quartiles
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def mean(found, pick):
        values = [pick(m) for m in found]
        values = [v for v in values if v is not None]
        return f"{fmean(values):.2f}" if values else "-"

    for arm, found in maps.items():
        cells = [arm, str(len(found)), mean(found, lambda m: m["mean_k_eff"])]
        cells += [mean(found, lambda m, i=i: m["by_layer"][i]) for i in layers]
        cells += [mean(found, lambda m, c=c: m["by_class"][c]["mean_k_eff"]) for c in classes]
        cells += [mean(found, lambda m, q=q: m["by_frequency"][q]["mean_k_eff"]) for q in quartiles]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _seed_mean_over_tasks(rows, arm, tasks, key):
    per_task = [_values(rows, arm, task, key) for task in tasks]
    if not all(per_task):
        return None
    return fmean(fmean(values) for values in per_task)


def write_plot(protocol, rows: list[dict], path: str) -> None:
    """Accuracy against whole-model FLOPs (vs top-k), one panel per task, mean ± std per arm."""
    tasks = list(protocol.tasks)
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4.2), squeeze=False)
    colors = plt.get_cmap("tab20")
    for axis, task in zip(axes[0], tasks):
        for number, arm in enumerate(protocol.arms):
            acc = [100 * a for a in _values(rows, arm, task, "acc")]
            flops = _values(rows, arm, task, "model_flops_pct")
            if not acc or not flops:
                continue
            (acc_mean, acc_std), (x_mean, x_std) = _mean_std(acc), _mean_std(flops)
            axis.errorbar(
                x_mean, acc_mean, yerr=acc_std, xerr=x_std, fmt="o", capsize=3,
                color=colors(number % 20), label=arm,
            )  # fmt: skip
        axis.set_title(task)
        axis.set_xlabel(f"model FLOPs per token vs top-{protocol.baseline_topk} (%)")
        axis.set_ylabel("accuracy (%)")
        axis.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="best")
    figure.suptitle(f"{protocol.name}: accuracy against compute (mean ± std over seeds)")
    figure.tight_layout()
    figure.savefig(path + ".tmp.png", dpi=110)
    plt.close(figure)
    os.replace(path + ".tmp.png", path)


def render(protocol, rows: list[dict], machine: dict, commands: list[str]) -> str:
    tasks = ", ".join(f"{t} ({f['eval']})" for t, f in protocol.tasks.items())
    lines = [
        f"# {protocol.name}",
        "",
        protocol.description.strip(),
        "",
        "Pretrained bases: "
        + "; ".join(
            f"{name}: arm `{p['arm']}`, seed {p['seed']} of `{p['grid']}`"
            + (f" with {p['overrides']}" if p.get("overrides") else "")
            for name, p in protocol.pretrain.items()
        )
        + f", each pretrained as its grid runs it. Tasks: {tasks}. Seeds: "
        f"{', '.join(map(str, protocol.seeds))} (fine-tuning order and adapter initialisation; "
        "the base is the same for every seed). Written by `tools/finetune_study.py` from the "
        "runs' own `eval.json` files (kept under `runs/`).",
        "",
        "## Results",
        "",
        "Acc.: lm-evaluation-harness `acc` in %, mean ± population std over seeds (number of "
        "seeds). Load: true experts per token, measured over the evaluated tokens, mean over MoE "
        f"layers. %FLOPs: whole-model forward FLOPs per token against top-{protocol.baseline_topk} "
        "with the same experts (negative: fewer). Avg.: the mean over tasks.",
        "",
        *table(protocol, rows),
        "",
        "![accuracy against FLOPs](accuracy_flops.png)",
        "",
    ]
    if any(_has_val(r) for r in rows):
        lines += [
            f"### Validation text ({protocol.validation})",
            "",
            "Each run's model (base, fine-tuned on that task, or with its adapters or "
            "allocators) on the held-out text: lm-evaluation-harness `bits_per_byte` (rolling "
            "log-likelihood), mean ± population std over seeds (number of runs); Load and %FLOPs "
            "measured on that text.",
            "",
            *validation_table(protocol, rows),
            "",
            "![validation loss against FLOPs](validation_flops.png)",
            "",
        ]
        frontier = frontier_table(protocol, rows)
        if frontier:
            lines += [
                f"Against the frontier of {', '.join(protocol.validation_frontier)} (the base "
                "as it is, at each k): each run's bits per byte minus the straight line between "
                "the frontier arms' means at that run's FLOPs (negative: below the frontier, "
                "better), mean ± std over seeds, and how many runs lie below.",
                "",
                *frontier,
                "",
            ]
    maps = compute_map_table(protocol, rows)
    if maps:
        text = protocol.compute_maps["text"]
        lines += [
            "### Compute maps",
            "",
            f"`tools/compute_map.py` over `{text}` for each mapped arm's runs of seed "
            f"{protocol.compute_maps['seed']} (every task's model): true experts per token, mean "
            "over the arm's maps, overall, by MoE layer, by token class (punctuation, "
            "word-initial piece, continuation piece) and by frequency quartile of the token in "
            "that text (Q1 rarest). Each map's PNG and summary.json are kept under "
            "`runs/<run>/compute_map/`; its HTML page (tokens coloured by experts used) is in "
            "the work directory, or rerun the listed command.",
            "",
            *maps,
            "",
        ]
    if protocol.discussion.strip():
        lines += ["## What the runs show", "", protocol.discussion.strip(), ""]
    lines += ["## Arms", ""]
    for arm, options in protocol.arms.items():
        settings = ", ".join(f"{k}={v}" for k, v in options.items())
        lines.append(f"- `{arm}`: {settings}")
    lines += [
        "",
        "Common fine-tuning flags: "
        + (", ".join(f"{k}={v}" for k, v in protocol.common.items()) or "none"),
        "",
        "## Commands",
        "",
        "Everything (resumable; rebuild this report alone with `--report-only`), then, as run "
        "(first task and seed of each arm):",
        "",
        "```",
        *commands,
        "```",
        "",
        "Machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "",
    ]
    return "\n".join(lines)
