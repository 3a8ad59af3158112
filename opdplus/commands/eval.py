"""`opdplus eval --model MODEL --task TASK [--limit N] [--batch-size B] [--samples-out FILE]`.

Prints the accuracy and, as the last line, one JSON object ``{"eval": {"task", "n", "accuracy"}}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from opdplus.eval.runner import EVAL_TASKS


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (``--limit 0`` or ``-3`` is a usage error, not "all items")."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value} (omit --limit to evaluate every item)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="HF directory or gguf:<package_module>/<file.gguf>")
    parser.add_argument("--task", required=True, choices=list(EVAL_TASKS), help="evaluation set")
    parser.add_argument("--limit", type=positive_int, default=None, help="evaluate the first N items only")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="prompts per generate call")
    parser.add_argument("--max-new-tokens", type=positive_int, default=None, help="default: per task")
    parser.add_argument("--samples-out", default=None, help="write one JSON line per item here")
    parser.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:N or auto")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from opdplus.eval.runner import evaluate, load_eval_items
    from opdplus.models.load import load_model_and_tokenizer, resolve_device
    from opdplus.models.sources import ModelSourceError

    try:
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype, device=resolve_device(args.device))
    except (ModelSourceError, ValueError, OSError) as err:
        print(f"error: opdplus eval --model {args.model}: {err}", file=sys.stderr)
        return 2
    model.eval()
    task, items = load_eval_items(args.task, tokenizer, args.limit)
    start = time.time()
    samples_out = open(args.samples_out, "w", encoding="utf-8") if args.samples_out else None
    try:
        with tqdm(total=len(items), desc=f"eval {args.task}", unit="item", file=sys.stderr) as bar:
            result = evaluate(
                model,
                tokenizer,
                args.task,
                limit=args.limit,
                batch_size=args.batch_size,
                max_new_tokens=args.max_new_tokens,
                samples_out=samples_out,
                progress=bar.update,
                task_and_items=(task, items),
            )
    finally:
        if samples_out is not None:
            samples_out.close()
    print(
        f"{args.task}: accuracy {result.accuracy:.4f} ({sum(s['correct'] for s in result.samples)}/{result.n}) "
        f"model {args.model} in {time.time() - start:.0f}s"
    )
    print(json.dumps({"eval": {"task": result.task, "n": result.n, "accuracy": result.accuracy}}))
    return 0
