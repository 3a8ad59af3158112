"""`opdplus serve-teacher`: serve a frozen teacher's prompt log-probs over an OpenAI/vLLM-compatible API.

    opdplus serve-teacher --model path/to/teacher --port 8000 [--api-key KEY]

Clients (``HTTPTeacher``, or anything speaking vLLM's completions API) POST token ids to
``/v1/completions`` with ``echo=true, max_tokens=0`` and ``logprobs`` or ``prompt_logprobs``.
Heavy imports happen in ``run`` so that ``opdplus --help`` stays fast without the serve extra.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

API_KEY_ENV = "OPDPLUS_TEACHER_API_KEY"


def port_number(text: str) -> int:
    """An argparse type: a TCP port in 1..65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"a TCP port is a whole number from 1 to 65535, got {text!r}")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="the teacher: a local HF model directory (with its tokenizer) or a gguf:<package>/<file.gguf> spec",
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=port_number, default=8000, help="TCP port, 1-65535 (default 8000)")
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require `Authorization: Bearer KEY` on /v1 routes (default: ${API_KEY_ENV})",
    )
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: --model as given)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: bfloat16 on CUDA, float32 elsewhere",
    )
    limits = parser.add_argument_group("limits")
    limits.add_argument(
        "--max-prompt-tokens",
        type=int,
        default=None,
        help="longest prompt accepted (default: the model's max_position_embeddings, else 8192)",
    )
    limits.add_argument("--max-prompts-per-request", type=int, default=256)
    limits.add_argument("--max-request-mb", type=float, default=16.0, help="largest request body, in MiB")
    limits.add_argument("--max-top-logprobs", type=int, default=20, help="largest logprobs / prompt_logprobs k")
    limits.add_argument(
        "--max-batch-tokens", type=int, default=16384, help="padded tokens (rows x longest prompt) per forward pass"
    )
    limits.add_argument("--max-batch-rows", type=int, default=64)
    limits.add_argument(
        "--max-queued-tokens", type=int, default=2**20, help="backlog beyond which requests get 503 (clients retry)"
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def run(args: argparse.Namespace) -> int:
    from opdplus.models.load import load_model_and_tokenizer, resolve_device
    from opdplus.models.sources import ModelSourceError
    from opdplus.rollout.openai_protocol import ServerLimits
    from opdplus.rollout.server import ScoringEngine, create_app, serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        device = resolve_device(args.device)
        dtype = ("bfloat16" if device.type == "cuda" else "float32") if args.dtype == "auto" else args.dtype
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype, device=device)
    except (ModelSourceError, ValueError, OSError) as exc:
        print(f"opdplus serve-teacher: {exc}", file=sys.stderr)
        return 2
    engine = ScoringEngine(model, tokenizer)
    max_prompt_tokens = args.max_prompt_tokens or getattr(model.config, "max_position_embeddings", None) or 8192
    limits = ServerLimits(
        max_request_bytes=int(args.max_request_mb * 2**20),
        max_prompts_per_request=args.max_prompts_per_request,
        max_prompt_tokens=max_prompt_tokens,
        max_top_logprobs=args.max_top_logprobs,
    )
    name = args.served_model_name or args.model
    app = create_app(
        engine,
        model_name=name,
        api_key=args.api_key,
        limits=limits,
        max_batch_tokens=args.max_batch_tokens,
        max_batch_rows=args.max_batch_rows,
        max_queued_tokens=args.max_queued_tokens,
    )
    logging.getLogger("opdplus.serve").info(
        "serving %s (vocab %d, %s) on http://%s:%d, limits %s",
        name,
        engine.vocab_size,
        engine.device,
        args.host,
        args.port,
        limits,
    )
    serve(app, host=args.host, port=args.port, api_key=args.api_key, log_level=args.log_level)
    return 0
