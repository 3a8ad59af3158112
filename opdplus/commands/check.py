"""`opdplus check`: verify the OPD / OPD+ estimators by exact enumeration and print the tables (single sequences,
multi-turn episodes with an environment token, and a teacher with another tokenizer)."""

from __future__ import annotations

import argparse
import json
import sys

from opdplus.check import (
    MULTITURN_TURNS,
    OPD_PLUS_TOLERANCE,
    cross_tokenizer_passed,
    format_cross_tokenizer_table,
    format_multiturn_table,
    format_table,
    multiturn_passed,
    passed,
    run_check,
    run_cross_tokenizer_check,
    run_multiturn_check,
)

MULTITURN_VOCAB = 3
CROSS_TOKENIZER_DEPTH = 3


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vocab", type=int, default=3, help="vocabulary size of the tabular policies (default 3)")
    parser.add_argument("--depth", type=int, default=3, help="sequence length (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random student and teacher logits")
    parser.add_argument("--json", action="store_true", help="print the table as JSON instead of text")


def run(args: argparse.Namespace) -> int:
    if args.vocab < 2 or args.depth < 1 or args.vocab**args.depth > 100_000:
        print(
            f"error: need vocab >= 2, depth >= 1 and vocab**depth <= 100000 (got {args.vocab}, {args.depth})",
            file=sys.stderr,
        )
        return 2
    rows = run_check(args.vocab, args.depth, args.seed)
    multiturn_rows = run_multiturn_check(MULTITURN_VOCAB, MULTITURN_TURNS, args.seed)
    cross_rows = run_cross_tokenizer_check(CROSS_TOKENIZER_DEPTH, args.seed)
    ok = passed(rows) and multiturn_passed(multiturn_rows) and cross_tokenizer_passed(cross_rows)
    if args.json:
        print(
            json.dumps(
                {
                    "check": {
                        "vocab": args.vocab,
                        "depth": args.depth,
                        "seed": args.seed,
                        "tolerance": OPD_PLUS_TOLERANCE,
                        "passed": ok,
                        "rows": rows,
                        "multiturn": {"vocab": MULTITURN_VOCAB, "turns": MULTITURN_TURNS, "rows": multiturn_rows},
                        "cross_tokenizer": {
                            "depth": CROSS_TOKENIZER_DEPTH,
                            "passed": cross_tokenizer_passed(cross_rows),
                            "rows": cross_rows,
                        },
                    }
                }
            )
        )
    else:
        print(format_table(rows, args.vocab, args.depth, args.seed))
        print()
        print(format_multiturn_table(multiturn_rows, MULTITURN_VOCAB, MULTITURN_TURNS, args.seed))
        print()
        print(format_cross_tokenizer_table(cross_rows, CROSS_TOKENIZER_DEPTH, args.seed))
    return 0 if ok else 1
