"""`opdplus sweep --config FILE`: a grid of distillation runs (estimators x divergences x seeds)."""

from __future__ import annotations

import argparse
import json

from opdplus.commands import line_buffered_stdout
from opdplus.eval.heldout import evaluate_heldout_run, heldout_reference
from opdplus.sweep import load_sweep_file, run_sweep
from opdplus.world.build import resolve_world_models, uses_world_models
from opdplus.world.evaluate import evaluate_run, world_reference


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
    data = load_sweep_file(args.config)
    evaluate = reference = None  # each run's own held-out evaluation (eval/ metrics)
    if uses_world_models(data["train"]):  # the demo world: built when missing, evaluated its own way
        data["train"], evaluate, reference = resolve_world_models(data["train"]), evaluate_run, world_reference
    elif data.get("evaluation") == "greedy":  # real tasks: greedy held-out accuracy with samples
        evaluate, reference = evaluate_heldout_run, heldout_reference
    summary = run_sweep(
        data,
        source=args.config,
        out=args.out,
        workers=args.workers,
        report=not args.no_report,
        evaluate=evaluate,
        reference=reference,
    )
    print(json.dumps({"sweep": summary}))
    return 0
