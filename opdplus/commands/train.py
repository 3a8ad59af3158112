"""``opdplus train``: distil a teacher into a student from a YAML config (see configs/)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML preset, e.g. configs/tiny.yaml")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="config overrides, e.g. loss.divergence=alpha loss.alpha=0.5 run.dir=runs/a",
    )
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing run directory and start over")
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="print every config key, one per line: key<TAB>type<TAB>default<TAB>help, and exit",
    )
    parser.add_argument(
        "--nproc",
        type=int,
        default=None,
        metavar="N",
        help="data-parallel training on N processes (runs torchrun; parallel.mode=ddp|fsdp)",
    )
    parser.epilog = (
        "examples:\n  opdplus train                      (no config: the demo on the embedded synthetic world)\n"
        "  opdplus train --config configs/tiny.yaml\n"
        "  opdplus train --config configs/tiny.yaml loss.divergence=jsd loss.estimator=opd_plus\n"
        "  opdplus train --resume runs/tiny\n"
        "  opdplus train --help-config        (every config key: type, default, help)\n"
        "  opdplus train --nproc 2 --config configs/tiny.yaml parallel.mode=fsdp\n"
        "  torchrun --nproc_per_node 2 -m opdplus train --config configs/tiny.yaml"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def _load(args: argparse.Namespace):
    from opdplus.train.config import ConfigError, load_config
    from opdplus.train.run_dir import resume_config

    if args.resume:
        if args.config:
            raise ConfigError("--resume takes the config saved in the run directory; do not also pass --config")
        return resume_config(args.resume, args.overrides)
    return load_config(args.config, args.overrides)


def run_demo() -> int:
    """``opdplus train`` with no config runs ``opdplus demo`` with its defaults."""
    from opdplus.commands import demo

    parser = argparse.ArgumentParser(prog="opdplus demo")
    demo.add_arguments(parser)
    print("opdplus train without --config: running the demo (opdplus demo) on the embedded synthetic world")
    return demo.run(parser.parse_args([]))


def launch_processes(args: argparse.Namespace) -> int:
    """``--nproc N``: re-run this command under torchrun with N processes (without ``--nproc``)."""
    import subprocess

    from opdplus.train.distributed import torchrun_command

    argv = [
        "train",
        *(["--config", args.config] if args.config else []),
        *(["--resume", args.resume] if args.resume else []),
        *(["--overwrite"] if args.overwrite else []),
        *args.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.run(torchrun_command(args.nproc, argv), env=env).returncode


def print_config_reference() -> None:
    from opdplus.train.config import config_reference

    for row in config_reference():
        print("\t".join(row))


def run(args: argparse.Namespace) -> int:
    if args.help_config:
        print_config_reference()
        return 0
    if args.nproc is not None and args.nproc < 1:
        print(f"error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    if args.nproc and args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return launch_processes(args)
    if not args.config and not args.resume:
        if not args.overrides:  # plain `opdplus train`: the embedded default, i.e. the demo
            return run_demo()
        print(
            "error: opdplus train needs --config FILE (try: opdplus train --config configs/tiny.yaml) "
            "or --resume RUN_DIR when given overrides",
            file=sys.stderr,
        )
        return 2
    from opdplus.models.load import DeviceError
    from opdplus.models.sources import ModelSourceError
    from opdplus.train.checkpoint import CheckpointWriteError, CorruptCheckpointError
    from opdplus.train.config import ConfigError
    from opdplus.train.loop import train
    from opdplus.train.run_dir import RunDirError

    try:
        cfg = _load(args)
        result = train(cfg, resume=bool(args.resume), overwrite=args.overwrite)
    except (
        ConfigError,
        RunDirError,
        CorruptCheckpointError,
        CheckpointWriteError,
        ModelSourceError,
        FileNotFoundError,
    ) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DeviceError as err:  # teacher.device is named by the builder; the one left is run.device
        print(f"error: run.device: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if type(err).__name__ not in ("TeacherUnavailableError", "TeacherRequestError"):
            raise
        when = "is back" if type(err).__name__ == "TeacherUnavailableError" else "accepts the requests"
        print(
            f"error: {err}\nThe last checkpoint is intact: once the teacher {when}, continue with "
            f"opdplus train --resume {cfg.run.dir}",
            file=sys.stderr,
        )
        return 3
    if os.environ.get("RANK", "0") != "0":
        return 0
    print(f"run directory: {result.run_dir}")
    if result.checkpoint is not None:
        print(f"checkpoint:    {result.checkpoint}/model")
    summary = {k: v for k, v in result.metrics.items() if not k.startswith("perf/")}
    print(json.dumps({"train": {"run_dir": str(result.run_dir), "step": result.step, "metrics": summary}}))
    return 0
