#!/usr/bin/env python3
"""Charts of pretraining runs: losses, per-layer load, k_eff histograms, and validation loss vs
expert FLOPs. Each RUN_DIR holds metrics.jsonl (adamoe_metrics_file) or tensorboard/ events.

    python tools/plot_runs.py runs/cpu_adamoe_tiny runs/cpu_top2_tiny --out plots/

Runs named <config>-seed<N> are averaged per config (mean line, min..max band).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_adamoe.errors import OptionError, report  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR")
    parser.add_argument("--out", required=True, help="directory for the PNG files")
    parser.add_argument(
        "--baseline-topk",
        type=int,
        default=2,
        help="expert FLOPs are measured load / this k (default 2)",
    )
    options = parser.parse_args(argv)
    from megatron_adamoe.analysis import plots
    from megatron_adamoe.analysis.runs import read_run

    try:
        if options.baseline_topk < 1:
            raise OptionError(
                f"baseline_topk ({options.baseline_topk}) must be >= 1; "
                "pass a positive --baseline-topk"
            )
        runs = [read_run(path) for path in options.runs]
        os.makedirs(options.out, exist_ok=True)
        written = plots.plot_all(runs, options.out, options.baseline_topk)
    except OptionError as error:
        return report(error)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
