"""`opdplus report RUN_DIR...`: a markdown table (mean ± std over seeds) and learning curves."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opdplus.report import write_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs",
        nargs="+",
        type=Path,
        metavar="RUN_DIR",
        help="run directories (with metrics.jsonl or result.json), or directories that contain them (a sweep's output)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where report.md and curves.png go (default: the first RUN_DIR)"
    )
    parser.add_argument("--title", default="Distillation report")


def run(args: argparse.Namespace) -> int:
    out = args.out or args.run_dirs[0]
    try:
        report = write_report(
            args.run_dirs, out, title=args.title, command="opdplus report " + " ".join(map(str, args.run_dirs))
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"report: {report}")
    return 0
