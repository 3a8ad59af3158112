"""`opdplus sweep --config FILE`: a grid of distillation runs (estimators x divergences x seeds)."""

from __future__ import annotations

import argparse
import json
import sys

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
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress shows up at once, also through a pipe
    summary = run_sweep(args.config, out=args.out, workers=args.workers, report=not args.no_report)
    print(json.dumps({"sweep": summary}))
    return 0
