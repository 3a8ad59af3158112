"""Teacher server benchmark: throughput and latency of `opdplus serve-teacher` under concurrent clients.

Starts the server as a subprocess on loopback (a tiny random Llama unless ``--model`` is given), then,
for each client count, runs that many asyncio clients each sending ``--requests`` scoring requests of
``--rows`` random prompts of ``--tokens`` tokens. Reports requests/s, scored tokens/s, p50/p99
latency and prompts per forward pass (dynamic batching, from ``/stats``). Prints a table and, last,
one JSON line ``{"bench": {"teacher_server": {...}}}``.

    python bench/teacher_server.py [--model DIR] [--clients 1,8,32] [--requests 20] [--rows 2] [--tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def tiny_model_dir(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def start_server(model: str, log_path: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        "opdplus",
        "serve-teacher",
        "--model",
        model,
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]
    proc = subprocess.Popen(
        cmd, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start; log:\n{log_path.read_text()[-2000:]}")


async def client(url: str, seed: int, n_requests: int, rows: int, tokens: int, vocab: int) -> list[float]:
    gen = random.Random(seed)
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        for _ in range(n_requests):
            prompts = [[gen.randrange(vocab) for _ in range(tokens)] for _ in range(rows)]
            start = time.perf_counter()
            response = await http.post(
                "/v1/completions", json={"prompt": prompts, "echo": True, "max_tokens": 0, "prompt_logprobs": 0}
            )
            response.raise_for_status()
            latencies.append(time.perf_counter() - start)
    return latencies


def measure(url: str, clients: int, args: argparse.Namespace, vocab: int) -> dict:
    before = httpx.get(url + "/stats").json()
    start = time.perf_counter()

    async def run_all() -> list[list[float]]:
        return await asyncio.gather(
            *(client(url, seed, args.requests, args.rows, args.tokens, vocab) for seed in range(clients))
        )

    latencies = sorted(x for per_client in asyncio.run(run_all()) for x in per_client)
    elapsed = time.perf_counter() - start
    after = httpx.get(url + "/stats").json()
    n = len(latencies)
    return {
        "clients": clients,
        "requests_per_s": n / elapsed,
        "tokens_per_s": n * args.rows * args.tokens / elapsed,
        "p50_ms": 1000 * statistics.median(latencies),
        "p99_ms": 1000 * latencies[min(n - 1, int(0.99 * n))],
        "prompts_per_forward": (after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--model", default=None, help="teacher model directory (default: a tiny random Llama)")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--rows", type=int, default=2, help="prompts per request")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per prompt")
    parser.add_argument("--vocab", type=int, default=256, help="token ids are drawn below this")
    parser.add_argument("--server-args", default="", help="extra serve-teacher flags, e.g. '--device cuda'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or str(tiny_model_dir(Path(tmp) / "tiny"))
        proc, url = start_server(model, Path(tmp) / "server.log", args.server_args.split())
        try:
            results = [measure(url, int(c), args, args.vocab) for c in args.clients.split(",")]
        finally:
            proc.kill()
            proc.wait()
    print(
        f"teacher server: {args.rows} prompts x {args.tokens} tokens per request, {args.requests} requests per client"
    )
    print(f"{'clients':>8}{'req/s':>10}{'tok/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'prompts/fwd':>13}")
    for r in results:
        print(
            f"{r['clients']:>8}{r['requests_per_s']:>10.1f}{r['tokens_per_s']:>12.0f}{r['p50_ms']:>10.1f}"
            f"{r['p99_ms']:>10.1f}{r['prompts_per_forward']:>13.1f}"
        )
    config = {"model": args.model or "tiny", "rows": args.rows, "tokens": args.tokens, "requests": args.requests}
    print(json.dumps({"bench": {"teacher_server": {"config": config, "results": results}}}))


if __name__ == "__main__":
    main()
