"""Update-step FLOP/s: forward + backward + AdamW step of the policy loss for a ~50M-parameter Llama-style
student (``opdplus.train.update.update_policy`` on a synthetic rollout batch), against this machine's matmul
peak (best of a large square matmul: fp32 on CPU, bf16 on CUDA). Peak and update are timed alternately.

FLOPs per update = 6 * N_body * (B*T) + 6 * N_head * (B*C) + attention, where N_body is the decoder's matmul
parameters (embedding lookups excluded), N_head the LM head (it runs only on the C completion positions),
and attention = 12 * L * d_attn * T per token (PaLM, appendix B; QK^T and AV, forward + backward, no
causal halving). Both the 6N-only and the 6N + attention figures are reported.

Last line: ``{"bench": {"flops": {"fraction_of_peak": ..., ...}}}``.

    python bench/flops.py [--quick] [--device cuda] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, format_table, median  # noqa: E402

# ~52M parameters: 12 layers of d=512 (GQA 8/4 heads, SwiGLU 1408) + 16384-token embedding and head.
MODEL = dict(hidden=512, layers=12, heads=8, kv_heads=4, intermediate=1408, vocab=16384)
QUICK = dict(batch=2, seq=128, prompt=16, rounds=2, matmul=1024)
FULL = dict(batch=8, seq=256, prompt=32, rounds=4, matmul=2048)


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def matmul_peak_flops(n: int, device: str, dtype, reps: int = 5) -> float:
    """Best FLOP/s of ``[n, n] @ [n, n]`` over ``reps`` calls (2 n^3 FLOPs each)."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _ = a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        _ = a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def build_student(device: str, dtype):
    from opdplus.models.tiny import build_tiny_model

    m = MODEL
    model = build_tiny_model(
        m["vocab"],
        hidden_size=m["hidden"],
        num_layers=m["layers"],
        num_heads=m["heads"],
        num_kv_heads=m["kv_heads"],
        intermediate_size=m["intermediate"],
        max_positions=4096,
        initializer_range=0.02,
    )
    # transformers declares PreTrainedModel.to as functools.wraps(nn.Module.to), which hides the bound self
    return model.to(device=device, dtype=dtype)  # pyright: ignore[reportCallIssue]


def synthetic_batch(vocab: int, batch: int, seq: int, prompt: int):
    """A full-length rollout batch (no padding) and random advantages."""
    import torch

    from opdplus.rollout.types import RolloutBatch

    g = torch.Generator().manual_seed(0)
    loss_mask = torch.zeros(batch, seq, dtype=torch.bool)
    loss_mask[:, prompt:] = True
    rollout = RolloutBatch(
        input_ids_B_T=torch.randint(3, vocab, (batch, seq), generator=g),
        attention_mask_B_T=torch.ones(batch, seq, dtype=torch.bool),
        loss_mask_B_T=loss_mask,
        sampler_logprobs_B_T=torch.where(loss_mask, -torch.rand(batch, seq, generator=g) * 5, 0.0),
        prompt_len=prompt,
    )
    return rollout, torch.where(loss_mask, torch.randn(batch, seq, generator=g), 0.0)


def update_flops(model, batch: int, seq: int, prompt: int) -> tuple[float, float]:
    """(6N FLOPs, attention FLOPs) of one update on a ``[batch, seq]`` batch with ``seq - prompt`` completions."""
    head = model.get_output_embeddings().weight.numel()
    embed = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - head - embed
    config = model.config
    d_attn = config.num_attention_heads * (config.hidden_size // config.num_attention_heads)
    dense = 6 * body * batch * seq + 6 * head * batch * (seq - prompt)
    attention = 12 * config.num_hidden_layers * d_attn * seq * batch * seq
    return float(dense), float(attention)


def phase_seconds(model, rollout, advantages, device: str, fused: bool) -> dict[str, float]:
    """Forward, backward and optimizer seconds of one update built from the loop's pieces (chunked
    log-probs, policy loss, grad clipping, AdamW with ``fused`` as given): what bounds the update."""
    import torch

    from opdplus.models.forward import completion_logprobs
    from opdplus.ops.loss import policy_loss

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=fused)
    times = {}
    for _ in range(2):  # the first pass allocates optimizer state; keep the second
        sync(device)
        start = time.perf_counter()
        student_lp = completion_logprobs(
            model, rollout.input_ids_B_T.to(device), rollout.attention_mask_B_T.to(device), rollout.prompt_len
        )
        loss = policy_loss(
            student_lp, rollout.sampler_logprobs_B_T.to(device), advantages.to(device), rollout.loss_mask_B_T.to(device)
        )
        sync(device)
        forward_done = time.perf_counter()
        loss.backward()
        sync(device)
        backward_done = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times = {
            "forward": forward_done - start,
            "backward": backward_done - forward_done,
            "optimizer": time.perf_counter() - backward_done,
        }
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    for key in FULL:
        parser.add_argument(f"--{key}", type=int, default=None)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)

    import torch

    from opdplus.train.update import update_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model = build_student(args.device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    rollout, advantages = synthetic_batch(MODEL["vocab"], args.batch, args.seq, args.prompt)

    def update() -> float:
        sync(args.device)
        start = time.perf_counter()
        update_policy(
            model,
            optimizer,
            scheduler,
            rollout,
            advantages,
            micro_batch_size=args.batch,
            clip_eps=None,
            max_grad_norm=1.0,
        )
        sync(args.device)
        return time.perf_counter() - start

    update()  # warm-up (allocations, optimizer state)
    peaks, seconds = [], []
    for _ in range(args.rounds):
        peaks.append(matmul_peak_flops(args.matmul, args.device, dtype))
        seconds.append(update())
    dense, attention = update_flops(model, args.batch, args.seq, args.prompt)
    peak, step_s = max(peaks), median(seconds)
    phases = {fused: phase_seconds(model, rollout, advantages, args.device, fused) for fused in (False, True)}
    achieved, achieved_attn = dense / step_s, (dense + attention) / step_s
    params = sum(p.numel() for p in model.parameters())
    print(
        f"update-step FLOP/s: {params / 1e6:.1f}M-parameter student, batch {args.batch} x {args.seq} tokens "
        f"({args.seq - args.prompt} completion), {args.device}/{str(dtype).removeprefix('torch.')}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds; matmul peak from {args.matmul}^2 matmuls"
    )
    print(
        format_table(
            ["quantity", "value"],
            [
                ["matmul peak GFLOP/s (best)", peak / 1e9],
                ["update step s (median)", step_s],
                ["update GFLOP/s (6N)", achieved / 1e9],
                ["update GFLOP/s (6N + attention)", achieved_attn / 1e9],
                ["fraction of peak (6N)", achieved / peak],
                ["fraction of peak (6N + attention)", achieved_attn / peak],
            ],
        )
    )
    base = phases[False]
    print("phases of one update (loop pieces; forward = 2N, backward = 4N of the 6N FLOPs):")
    print(
        format_table(
            ["phase", "seconds", "fraction of peak"],
            [
                ["forward", base["forward"], dense / 3 / base["forward"] / peak],
                ["backward", base["backward"], dense * 2 / 3 / base["backward"] / peak],
                ["optimizer (AdamW, for-each/loop)", base["optimizer"], "-"],
                ["optimizer (AdamW, fused=True)", phases[True]["optimizer"], "-"],
            ],
        )
    )
    emit(
        "flops",
        {
            "fraction_of_peak": round(achieved / peak, 4),
            "fraction_of_peak_with_attention": round(achieved_attn / peak, 4),
            "update_gflops": round(achieved / 1e9, 2),
            "peak_gflops": round(peak / 1e9, 2),
            "update_step_s": round(step_s, 4),
            "params_m": round(params / 1e6, 2),
            "phases_s": {
                **{k: round(v, 4) for k, v in base.items()},
                "optimizer_fused": round(phases[True]["optimizer"], 4),
            },
            "config": {**MODEL, **{k: getattr(args, k) for k in (*FULL, "device", "threads")}, "dtype": str(dtype)},
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
