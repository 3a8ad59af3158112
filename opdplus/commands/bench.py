"""`opdplus bench [--quick]`: run the benchmarks of the top-level ``bench/`` folder; the last line is their
merged ``{"bench": {...}}`` JSON object (exit status 1 when one failed)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from opdplus import benchmarks


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="small configurations (a few minutes on a laptop CPU)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: each script's own default, cpu)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=benchmarks.BENCHMARKS,
        metavar="NAME",
        help=f"run only these benchmarks ({', '.join(benchmarks.BENCHMARKS)})",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the merged JSON object to this file")


def run(args: argparse.Namespace) -> int:
    if not benchmarks.BENCH_DIR.is_dir():
        print(
            f"error: no benchmark folder at {benchmarks.BENCH_DIR}; `opdplus bench` runs from a source checkout",
            file=sys.stderr,
        )
        return 2
    script_args = (["--quick"] if args.quick else []) + (["--device", args.device] if args.device else [])
    merged, failed = benchmarks.run_benchmarks(args.only or benchmarks.BENCHMARKS, script_args)
    if args.out is not None:
        args.out.write_text(json.dumps(merged, indent=2) + "\n")
    print(json.dumps(merged), flush=True)
    return 1 if failed else 0
