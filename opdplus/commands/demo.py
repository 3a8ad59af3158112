"""`opdplus demo`: OPD vs OPD+ on the embedded synthetic world, in minutes on a CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opdplus.commands import line_buffered_stdout
from opdplus.world.demo import run_demo


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/demo"), help="run directory (default: runs/demo)")
    parser.add_argument(
        "--steps", type=int, default=None, help="distillation steps per run (default: run.steps of configs/demo.yaml)"
    )
    parser.add_argument(
        "--eval-items", type=int, default=200, help="held-out problems per task for the final evaluation"
    )
    parser.add_argument("--workers", type=int, default=2, help="runs in parallel (one CPU thread each)")
    parser.add_argument("--world", type=Path, default=None, help="world directory (default: $OPDPLUS_CACHE/world-v3)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="overrides of the runs' train config, e.g. optim.lr=2e-3 data.prompts_per_step=32",
    )


def run(args: argparse.Namespace) -> int:
    line_buffered_stdout()
    summary = run_demo(
        args.out,
        steps=args.steps,
        eval_items=args.eval_items,
        workers=args.workers,
        overrides=args.overrides,
        world_root=args.world,
    )
    print(json.dumps(summary))
    return 0
