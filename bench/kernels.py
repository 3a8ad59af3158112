"""Kernels benchmark: chunked vs naive target log-probs and exact divergence at a large vocabulary.

Each variant runs forward + backward (the student's gradient path) in its own subprocess, so its peak
memory is measured cleanly: on CPU as the rise of the process's peak RSS over its RSS just before the
first call, on CUDA as torch.cuda.max_memory_allocated. Variants run alternately (A, B, A, B, ...)
and the median time per variant is reported. Prints a table and, last, one JSON line
``{"bench": {"kernels": {...}}}`` with chunked/naive ratios (< 1 = chunked is smaller / faster).

    python bench/kernels.py [--quick] [--device cuda] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("logprobs_naive", "logprobs_chunked", "exact_naive", "exact_chunked")


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_worker(
    variant: str, batch: int, seq: int, hidden: int, vocab: int, chunk: int, reps: int, device: str, dtype_name: str
) -> dict:
    """Time forward+backward of one variant ``reps`` times; peak memory of the first call."""
    import torch

    from opdplus.ops.chunked import chunked_exact_divergence
    from opdplus.ops.exact import exact_divergence
    from opdplus.ops.logprobs import chunked_target_logprobs, naive_target_logprobs

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    student_head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype)
    teacher_head = torch.nn.Linear(hidden, vocab, bias=False, device=device, dtype=dtype).requires_grad_(False)
    student_hidden = torch.randn(batch, seq, hidden, device=device, dtype=dtype, requires_grad=True)
    teacher_hidden = torch.randn(batch, seq, hidden, device=device, dtype=dtype)
    targets = torch.randint(0, vocab, (batch, seq), device=device)

    def step() -> None:
        if variant == "logprobs_naive":
            value = naive_target_logprobs(student_head(student_hidden), targets)
        elif variant == "logprobs_chunked":
            value = chunked_target_logprobs(student_hidden, student_head, targets, chunk_size=chunk)
        elif variant == "exact_naive":
            value = exact_divergence(student_head(student_hidden), teacher_head(teacher_hidden), "forward_kl")
        else:
            value = chunked_exact_divergence(
                student_hidden, student_head, teacher_hidden, teacher_head, "forward_kl", chunk_size=chunk
            )
        value.float().mean().backward()
        student_hidden.grad = None
        student_head.weight.grad = None

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    step()
    sync()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else _peak_rss_mb()) - base
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {"variant": variant, "peak_mb": peak, "seconds": statistics.median(times)}


def spawn(variant: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--hidden",
        str(args.hidden),
        "--vocab",
        str(args.vocab),
        "--chunk",
        str(args.chunk),
        "--reps",
        str(args.reps),
        "--device",
        args.device,
        "--dtype",
        args.dtype,
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller batch and sequence, fewer rounds")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=576, help="576 = SmolLM2-135M")
    parser.add_argument("--vocab", type=int, default=49152, help="49152 = SmolLM2's vocabulary")
    parser.add_argument("--chunk", type=int, default=256, help="tokens (rows x positions) per block of logits")
    parser.add_argument("--reps", type=int, default=None, help="timed calls per worker")
    parser.add_argument("--rounds", type=int, default=None, help="A/B rounds (one worker per variant each)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch = args.batch or (4 if args.quick else 8)
    args.seq = args.seq or (256 if args.quick else 512)
    args.reps = args.reps or (1 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 2)
    if args.worker:
        print(
            json.dumps(
                run_worker(
                    args.worker,
                    args.batch,
                    args.seq,
                    args.hidden,
                    args.vocab,
                    args.chunk,
                    args.reps,
                    args.device,
                    args.dtype,
                )
            )
        )
        return 0

    results: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:  # naive and chunked alternate
            results[variant].append(spawn(variant, args))
    summary = {
        v: {"peak_mb": max(r["peak_mb"] for r in rs), "seconds": statistics.median(r["seconds"] for r in rs)}
        for v, rs in results.items()
    }
    print(
        f"kernels: B={args.batch} T={args.seq} H={args.hidden} V={args.vocab} chunk={args.chunk} "
        f"device={args.device} dtype={args.dtype}; forward + backward, median of {args.rounds}x{args.reps}"
    )
    print(f"{'variant':<18}{'seconds':>10}{'peak MB':>10}")
    for variant, s in summary.items():
        print(f"{variant:<18}{s['seconds']:>10.3f}{s['peak_mb']:>10.0f}")
    ratios = {}
    for kind in ("logprobs", "exact"):
        naive, chunked = summary[f"{kind}_naive"], summary[f"{kind}_chunked"]
        ratios[f"{kind}_memory_ratio"] = chunked["peak_mb"] / max(naive["peak_mb"], 1e-9)
        ratios[f"{kind}_time_ratio"] = chunked["seconds"] / naive["seconds"]
        print(
            f"{kind}: chunked/naive peak memory {ratios[f'{kind}_memory_ratio']:.3f}, "
            f"time {ratios[f'{kind}_time_ratio']:.2f}"
        )
    config = {k: getattr(args, k) for k in ("batch", "seq", "hidden", "vocab", "chunk", "device", "dtype")}
    print(json.dumps({"bench": {"kernels": {**ratios, "config": config, "results": summary}}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
