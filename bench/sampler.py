"""Sampler benchmark: HF ``generate`` (``Sampler``) vs our decode loop (``FastSampler``), and ``torch.compile``.

Same random Llama-style student, same ragged prompts, same settings (untempered sampling, EOS ends a row),
variants run alternately (A, B, C, A, B, C, ...) in one process; the median seconds per batch are reported
as completion tokens/s. The compiled variant's first call (compilation) is timed separately and excluded.
Last line: ``{"bench": {"sampler": {"fast_over_hf": ..., "compiled_over_fast": ...}}}`` (> 1 = faster).

    python bench/sampler.py [--quick] [--device cuda] [--compile | --no-compile] [--head] [--vocab V ...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, format_table, median, ratio  # noqa: E402

QUICK = dict(hidden=128, layers=2, heads=4, kv_heads=2, vocab=1024, batch=8, prompt=24, new_tokens=32, rounds=3)
FULL = dict(hidden=512, layers=8, heads=8, kv_heads=4, vocab=8192, batch=16, prompt=64, new_tokens=128, rounds=5)


def build(args: argparse.Namespace):
    """(model, tokenizer stand-in, prompts): a random student and ragged random prompts."""
    import torch

    from opdplus.models.tiny import build_tiny_model

    model = build_tiny_model(
        args.vocab,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=4 * args.hidden,
        max_positions=args.prompt + args.new_tokens + 8,
        initializer_range=0.02,
    )
    # transformers declares PreTrainedModel.to as functools.wraps(nn.Module.to), which hides the bound self
    model = model.to(device=args.device, dtype=getattr(torch, args.dtype))  # pyright: ignore[reportCallIssue]
    model.eval()
    rng = torch.Generator().manual_seed(0)
    lengths = torch.randint(max(1, args.prompt // 4), args.prompt + 1, (args.batch,), generator=rng)
    prompts = [torch.randint(3, args.vocab, (int(n),), generator=rng).tolist() for n in lengths]
    return model, _Tokenizer(), prompts


class _Tokenizer:
    """The two attributes the samplers read from a tokenizer (pad 0, EOS 2 as in ``build_tiny_model``)."""

    pad_token_id = 0
    eos_token_id = 2


def time_variant(sampler, prompts, device: str) -> tuple[float, int]:
    """Seconds for one batch and the number of completion tokens produced."""
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    tokens = int(sampler.sample_ids(prompts).loss_mask_B_T.sum())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, tokens


def make_samplers(model, tokenizer, args: argparse.Namespace) -> dict:
    import torch

    from opdplus.rollout.fast_sampler import FastSampler
    from opdplus.rollout.sampler import Sampler, SamplingSettings

    settings = SamplingSettings(max_new_tokens=args.new_tokens, batch_size=args.batch)
    gen = lambda: torch.Generator(device=args.device).manual_seed(0)  # noqa: E731
    samplers = {
        "hf_generate": Sampler(model, tokenizer, settings, gen()),
        "fast": FastSampler(model, tokenizer, settings, gen()),
    }
    if args.compile:
        samplers["fast_compiled"] = FastSampler(model, tokenizer, settings, gen(), compile=True)
    if args.head:
        samplers["fast_plain_head"] = PlainHead(FastSampler(model, tokenizer, settings, gen()))
    return samplers


class PlainHead:
    """A FastSampler whose decode step calls the LM head as ``head(h)``: times ``head_logits``' layout choice."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler

    def sample_ids(self, prompts):
        import opdplus.rollout.fast_sampler as fast_sampler

        chosen, fast_sampler.head_logits = fast_sampler.head_logits, lambda head, hidden, weight=None: head(hidden)
        try:
            return self.sampler.sample_ids(prompts)
        finally:
            fast_sampler.head_logits = chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time FastSampler(compile=True) (default: on, off with --quick: it compiles for ~1 min)",
    )
    parser.add_argument(
        "--head",
        action="store_true",
        help="also time FastSampler with a plain head(h) call (what head_logits' layout choice gains)",
    )
    for key in FULL:
        parser.add_argument(f"--{key.replace('_', '-')}", type=int, default=None)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.compile is None:
        args.compile = not args.quick

    model, tokenizer, prompts = build(args)
    samplers = make_samplers(model, tokenizer, args)
    warmup = {name: time_variant(s, prompts, args.device)[0] for name, s in samplers.items()}  # compile happens here
    seconds = {name: [] for name in samplers}
    tokens = {name: 0 for name in samplers}
    for _ in range(args.rounds):
        for name, sampler in samplers.items():
            elapsed, produced = time_variant(sampler, prompts, args.device)
            seconds[name].append(elapsed)
            tokens[name] = produced
    tok_s = {name: tokens[name] / median(seconds[name]) for name in samplers}
    rows = [[name, tokens[name], median(seconds[name]), tok_s[name], warmup[name]] for name in samplers]
    print(
        f"sampler benchmark: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers, batch {args.batch}, "
        f"prompts <= {args.prompt}, {args.new_tokens} new tokens, {args.device}/{args.dtype}, {args.rounds} rounds"
    )
    print(format_table(["variant", "tokens", "median_s", "tok_per_s", "first_call_s"], rows))
    result = {
        "fast_over_hf": ratio(tok_s["fast"], tok_s["hf_generate"]),
        "tok_s": {k: round(v, 2) for k, v in tok_s.items()},
        "config": {k: getattr(args, k) for k in (*FULL, "device", "dtype")},
    }
    if "fast_plain_head" in tok_s:
        result["head_layout_gain"] = ratio(tok_s["fast"], tok_s["fast_plain_head"])
    if "fast_compiled" in tok_s:
        result["compiled_over_fast"] = ratio(tok_s["fast_compiled"], tok_s["fast"])
        result["compile_first_call_s"] = round(warmup["fast_compiled"], 2)
    emit("sampler", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
