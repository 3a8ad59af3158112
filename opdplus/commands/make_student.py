"""`opdplus make-student`: a smaller student that keeps K of the teacher's decoder layers."""

from __future__ import annotations

import argparse

from opdplus.models.prune import STRATEGIES, make_student


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from", dest="teacher", required=True, help="teacher model: HF dir or gguf:<pkg>/<file.gguf>")
    parser.add_argument("--layers", type=int, required=True, help="number of decoder layers to keep")
    parser.add_argument("--strategy", choices=STRATEGIES, default="uniform", help="which layers to keep")
    parser.add_argument("--out", required=True, help="output HF directory")


def run(args: argparse.Namespace) -> int:
    keep_idx = make_student(args.teacher, args.layers, args.out, args.strategy)
    print(f"saved {len(keep_idx)}-layer student to {args.out} (kept teacher layers {keep_idx})")
    return 0
