"""`opdplus <command>`: one thin module per verb, ``opdplus/commands/<verb>.py`` (``-`` -> ``_``), with
``add_arguments(parser)`` and ``run(args)``: argument parsing and the call into the library, nothing else."""

from __future__ import annotations

import argparse
import importlib
import io
import sys

# verb -> one-line help. A verb's module is imported only when it runs (fast start; one broken command
# cannot break the others).
COMMANDS: dict[str, str] = {
    "check": "verify the OPD / OPD+ estimators by exact enumeration",
    "train": "distil a teacher into a student (on-policy, OPD / OPD+ advantages)",
    "serve-teacher": "serve a teacher's prompt log-probs over an OpenAI/vLLM-compatible HTTP API",
    "make-student": "build a smaller student by keeping K of the teacher's decoder layers",
    "eval": "evaluate a model on GSM8K, AIME 2025, held-out math or BFCL v4",
    "sft": "fine-tune a teacher with LoRA on a task's train split (TRL SFTTrainer), then score its held-out items",
    "pretrain-teacher": "build the demo world: a synthetic-task teacher (>= 95%) and a weaker student",
    "demo": "OPD vs OPD+ on the synthetic world: distil, evaluate, print a table, write a report",
    "sweep": "run a grid of distillation runs (estimators x divergences x seeds) from a YAML file",
    "report": "aggregate run directories into a markdown table (mean ± std) and learning curves",
    "bench": "run the benchmarks in bench/ (sampler, kernels, update FLOP/s, loop vs TRL); last line: merged JSON",
}


def line_buffered_stdout() -> None:
    """Progress lines show up at once, also through a pipe."""
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)


def module_name(verb: str) -> str:
    """``serve-teacher`` -> ``opdplus.commands.serve_teacher``."""
    return f"{__name__}.{verb.replace('-', '_')}"


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``selected`` verb's module is imported."""
    parser = argparse.ArgumentParser(
        prog="opdplus",
        description="On-policy distillation with unbiased f-divergence advantages (OPD+).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for verb, help_text in COMMANDS.items():
        cmd = sub.add_parser(verb, help=help_text.replace("%", "%%"), description=help_text)  # help is %-formatted
        cmd.set_defaults(_module=module_name(verb))
        if verb == selected:
            importlib.import_module(module_name(verb)).add_arguments(cmd)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected)
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come anywhere on the line, also after a flag (`--overwrite run.steps=3`)
    if extra and hasattr(args, "overrides") and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not args.command:
        build_parser().print_help()
        return 0
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
