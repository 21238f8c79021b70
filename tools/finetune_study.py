#!/usr/bin/env python3
"""Run the paper's fine-tuning protocol (a pretrained base, fine-tuning arms x tasks x seeds,
each scored by adamoe-eval) and write its report.

    python tools/finetune_study.py configs/study/cpu_table1.yaml          # run what is missing
    python tools/finetune_study.py configs/study/cpu_table1.yaml --report-only

Work goes under --runs-dir/<name>/ (pretrain/, bases/, runs/<arm>-<task>-seed<N>/; resumable:
rerun the same command after a stop); the report (results.csv, accuracy_flops.png, README.md and
each run's eval.json) under --out/<name>/. Needs `make data tasks`.
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
    parser.add_argument("protocol", help="protocol file (YAML), e.g. configs/study/cpu_table1.yaml")
    parser.add_argument("--runs-dir", default="runs/study", help="where the work lives")
    parser.add_argument("--out", default="docs/study", help="where the report goes")
    parser.add_argument(
        "--report-only", action="store_true", help="rebuild the report; run nothing"
    )
    parser.add_argument("--no-progress", action="store_true")
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from megatron_adamoe.analysis import finetune_study
    from megatron_adamoe.analysis.protocol import load_protocol

    try:
        protocol = load_protocol(options.protocol)
        if not options.report_only:
            finetune_study.run_protocol(
                protocol, options.runs_dir, options.out, progress=not options.no_progress
            )
        path = finetune_study.write_report(protocol, options.out)
    except OptionError as error:
        return report(error)
    print(f"report: {path}" if path else "no finished run yet: nothing to report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
