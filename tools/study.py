#!/usr/bin/env python3
"""Run a study grid (configs x seeds) through the pretraining entry point and write its report.

    python tools/study.py configs/study/cpu_shakespeare.yaml          # run what is missing
    python tools/study.py configs/study/cpu_shakespeare.yaml --report-only

Runs go under --runs-dir/<name>/<config>-seed<N>/ (resumable: rerun the same command after a
stop); the report (results.csv, plots, README.md, each run's metrics) under --out/<name>/.
"""

from __future__ import annotations

import argparse
import logging
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
    parser.add_argument("grid", help="grid file (YAML), e.g. configs/study/cpu_shakespeare.yaml")
    parser.add_argument("--runs-dir", default="runs/study", help="where the runs live")
    parser.add_argument("--out", default="docs/study", help="where the report goes")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rebuild the report from the kept metrics; run nothing",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--timing",
        action="store_true",
        help="a timing pass (run it with the machine otherwise idle): each config "
        "a few steps, alternating; writes timing.csv, then the report",
    )
    parser.add_argument("--timing-steps", type=int, default=40)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_adamoe.analysis import study
    from megatron_adamoe.analysis.grid import load_grid

    try:
        grid = load_grid(options.grid)
        if options.timing:
            study.time_arms(grid, options.runs_dir, options.out, options.timing_steps)
        elif not options.report_only:
            study.run_grid(grid, options.runs_dir, options.out, progress=not options.no_progress)
        path = study.write_report(grid, options.out)
    except OptionError as error:
        return report(error)
    print(f"report: {path}" if path else "no finished run yet: nothing to report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
