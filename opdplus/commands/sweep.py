"""`opdplus sweep --config FILE`: a grid of distillation runs (estimators x divergences x seeds)."""

from __future__ import annotations

import argparse
import json

from opdplus.commands import line_buffered_stdout
from opdplus.sweep import run_sweep


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, metavar="FILE", help="sweep YAML, e.g. configs/sweep.yaml")
    parser.add_argument("--out", default=None, help="output directory (default: the file's `out`)")
    parser.add_argument(
        "--workers", type=int, default=None, help="parallel runs (default: the file's `workers`, else 2)"
    )
    parser.add_argument(
        "--no-report", action="store_true", help="skip writing report.md and plots into the output directory"
    )


def run(args: argparse.Namespace) -> int:
    line_buffered_stdout()
    summary = run_sweep(args.config, out=args.out, workers=args.workers, report=not args.no_report)
    print(json.dumps({"sweep": summary}))
    return 0
