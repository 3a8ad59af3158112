"""``opdplus sft --config FILE [KEY=VALUE ...]``: fine-tune LoRA adapters on a task's train split (TRL's
``SFTTrainer``), then score the held-out items; last line: one JSON object ``{"sft": {...}}``."""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML preset, e.g. configs/smollm2_sft_math.yaml")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. run.steps=20 run.dir=runs/sft-probe"
    )
    parser.add_argument(
        "--help-config",
        action="store_true",
        help="print every config key, one per line: key<TAB>type<TAB>default<TAB>help, and exit",
    )
    parser.epilog = (
        "examples:\n  opdplus sft --config configs/smollm2_sft_math.yaml\n"
        "  opdplus sft --config configs/smollm2_sft_math.yaml run.steps=20 run.dir=runs/sft-probe\n"
        "  (run the same command again to continue a killed run from its newest checkpoint)"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def run(args: argparse.Namespace) -> int:
    from opdplus.train.config import ConfigError, config_reference
    from opdplus.train.sft import SftConfig, load_sft_config, sft

    if args.help_config:
        for row in config_reference(SftConfig()):
            print("\t".join(row))
        return 0
    if not args.config and not args.overrides:
        print("error: opdplus sft needs --config FILE (try: configs/smollm2_sft_math.yaml)", file=sys.stderr)
        return 2
    from opdplus.models.sources import ModelSourceError

    try:
        result = sft(load_sft_config(args.config, args.overrides))
    except (ConfigError, ModelSourceError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"adapter: {result.adapter_dir} (sha256 {result.adapter_sha256})")
    if result.eval_accuracy is not None:
        print(f"held-out accuracy: {result.eval_accuracy:.4f} on {result.eval_n} items")
    summary = {
        "run_dir": str(result.run_dir),
        "adapter_sha256": result.adapter_sha256,
        "final_loss": result.train_loss[-1] if result.train_loss else None,
        "eval": {"n": result.eval_n, "accuracy": result.eval_accuracy},
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
    }
    print(json.dumps({"sft": summary}))
    return 0
