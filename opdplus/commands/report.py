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
    parser.add_argument(
        "--notes",
        type=Path,
        default=None,
        metavar="FILE",
        help="a markdown file appended to report.md (the narrative that survives regenerating the report)",
    )


def run(args: argparse.Namespace) -> int:
    out = args.out or args.run_dirs[0]
    command = "opdplus report " + " ".join(map(str, args.run_dirs))
    try:
        notes = args.notes.read_text() if args.notes is not None else ""
    except OSError as err:
        print(f"error: cannot read --notes {args.notes}: {err.strerror or err}", file=sys.stderr)
        return 2
    try:
        report = write_report(args.run_dirs, out, title=args.title, command=command, notes=notes)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(report.read_text())
    print(f"report: {report}")
    return 0
