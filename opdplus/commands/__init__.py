"""`opdplus <command>`: each command lives in its own module with ``add_arguments`` and ``run``."""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("opdplus.check", "verify the OPD / OPD+ estimators by exact enumeration"),
    "train": ("opdplus.train.cli", "distil a teacher into a student (on-policy, OPD / OPD+ advantages)"),
    "serve-teacher": (
        "opdplus.rollout.serve_command",
        "serve a teacher's prompt log-probs over an OpenAI/vLLM-compatible HTTP API",
    ),
    "make-student": ("opdplus.models.prune", "build a smaller student by keeping K of the teacher's decoder layers"),
    "eval": ("opdplus.eval.command", "evaluate a model on GSM8K, AIME 2025, held-out math or BFCL v4"),
    "pretrain-teacher": (
        "opdplus.world_command",
        "build the demo world: a synthetic-task teacher (>= 95%) and a weaker student",
    ),
    "demo": ("opdplus.demo", "OPD vs OPD+ on the synthetic world: distil, evaluate, print a table, write a report"),
    "sweep": ("opdplus.sweep", "run a grid of distillation runs (estimators x divergences x seeds) from a YAML file"),
    "report": ("opdplus.report", "aggregate run directories into a markdown table (mean ± std) and learning curves"),
    "bench": (
        "opdplus.bench_command",
        "run the benchmarks in bench/ (sampler, kernels, update FLOP/s, loop vs TRL); last line: merged JSON",
    ),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` command's module is imported (fast start, and one broken
    command cannot break the others)."""
    parser = argparse.ArgumentParser(
        prog="opdplus",
        description="On-policy distillation with unbiased f-divergence advantages (OPD+).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text.replace("%", "%%"), description=help_text)  # help is %-formatted
        cmd.set_defaults(_module=module_name)
        if name == selected:
            importlib.import_module(module_name).add_arguments(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(selected).parse_args(argv)
    if not args.command:
        build_parser().print_help()
        return 0
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
