"""`opdplus pretrain-teacher`: build (or show) the cached demo world's teacher and student."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from opdplus.commands import line_buffered_stdout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="world directory (default: $OPDPLUS_CACHE/world-v3, $OPDPLUS_CACHE defaults to ~/.cache/opdplus)",
    )
    parser.add_argument("--force", action="store_true", help="rebuild even when the world is already cached")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads for the build (default 1: fastest for these tiny models)",
    )


def run(args: argparse.Namespace) -> int:
    line_buffered_stdout()
    from opdplus.world.build import ensure_world, load_world_info, world_paths, world_ready

    cached = world_ready(world_paths(args.out)) and not args.force
    paths = ensure_world(args.out, rebuild=args.force, threads=args.threads)
    info = load_world_info(paths)
    if cached:
        print(f"world already cached in {paths.root} (use --force to rebuild)")
    for role in ("teacher", "student"):
        accuracy = "  ".join(f"{task}={acc:.3f}" for task, acc in info[role]["eval_accuracy"].items())
        print(f"{role:8s} {getattr(paths, role)}  held-out greedy accuracy: {accuracy}")
    print(
        json.dumps(
            {
                "world": {
                    "root": str(paths.root),
                    "build_seconds": info["build_seconds"],
                    "teacher": info["teacher"]["eval_accuracy"],
                    "student": info["student"]["eval_accuracy"],
                }
            }
        )
    )
    return 0
