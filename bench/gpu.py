"""Device benchmark: one OPD+ step of opdplus (and of TRL's ``DistillationTrainer``, when it imports) on a GPU.

Randomly initialised models built from configs in code (nothing downloaded): a Qwen3-0.6B-shaped student
(d 1024 x 28 layers, 16/8 heads, MLP 3072, tied embeddings) and a Qwen3-1.7B-shaped teacher (d 2048 x 28,
MLP 6144), vocabulary 151936, over the character tokenizer (prompts of the ``contains`` task). A batch of 64
prompts, one completion each, 512 new tokens (random models practically never emit EOS: every row runs
to the end on both sides).

Ours runs the training loop's own pieces in this process (``FastSampler``, which takes the CUDA-graph
decode on CUDA; ``LocalTeacher.score``; advantages; ``update_policy`` in micro-batches of 16) with
``run.precision=bf16-mixed`` (float32 student weights and AdamW, bfloat16 autocast) and a bfloat16 teacher.
TRL runs ``DistillationTrainer`` on copies of the same initial weights with ``bf16=True``, 16 x 4 gradient
accumulation (its generation batch is the 64 prompts), reverse KL (``beta=1``); phases timed as in
``bench/loop_vs_trl.py``. Reported per side: sampling, scoring, update and total completion tokens/s,
peak GPU memory, and the update's model-FLOP utilisation

    MFU = 6 x student parameters x update tokens / update seconds / peak,

update tokens = the real (prompt + completion) tokens the update's forward and backward process, against
the measured 790 and the datasheet 989 TFLOP/s bf16 of an H200. Last, a bf16-vs-fp32 check: one update
step of a tiny model under both precisions, losses within ``BF16_LOSS_RTOL``.

Output: a table per side; after each phase one JSON line appended to ``$OUT/gpu.jsonl`` (``--out-dir``,
default ``$OUT``), so a run cut short still leaves what it measured; the last printed line is the whole
result, ``{"bench": {"gpu": {...}}}``. ``--tiny`` runs the same code with tiny models on CPU in seconds.

    python bench/gpu.py [--tiny] [--no-trl] [--steps 2] [--out-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, format_table, ratio  # noqa: E402

H200_MEASURED_TFLOPS = 790.0  # dense bf16 matmul measured on an H200
H200_DATASHEET_TFLOPS = 989.0  # NVIDIA's dense bf16 figure
BF16_LOSS_RTOL = 2e-2  # one update step's loss, bf16-mixed vs fp32 (tests/integration/test_precision.py)

QWEN3 = dict(
    head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, max_position_embeddings=4096
)
FULL: dict[str, Any] = dict(
    vocab=151936,
    student=dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, intermediate_size=3072
    ),
    teacher=dict(
        hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, intermediate_size=6144
    ),
    batch=64,
    new_tokens=512,
    micro_batch=16,
    chunk_tokens=4096,
    teacher_batch=16,
)
TINY: dict[str, Any] = dict(
    vocab=1024,
    student=dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        head_dim=16,
    ),
    teacher=dict(
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        head_dim=24,
    ),
    batch=4,
    new_tokens=8,
    micro_batch=2,
    chunk_tokens=256,
    teacher_batch=4,
)


class Recorder:
    """Appends one JSON line per phase to ``<out_dir>/gpu.jsonl`` (flushed and synced) and keeps the result."""

    def __init__(self, out_dir: str | None) -> None:
        self.path = Path(out_dir) / "gpu.jsonl" if out_dir else None
        self.result: dict[str, Any] = {}

    def phase(self, name: str, values: dict[str, Any]) -> None:
        self.result[name] = values
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"phase": name, **values}) + "\n")
                fh.flush()
                os.fsync(fh.fileno())


# ---------------------------------------------------------------- models and data


def build_model(shape: dict, vocab: int, tokenizer: Any, device: Any, dtype: Any, seed: int) -> Any:
    """A randomly initialised Qwen3 causal LM of ``shape``, built directly on ``device`` in ``dtype``."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from opdplus.models.tiny import special_token_ids

    pad, bos, eos = special_token_ids(tokenizer)
    config = Qwen3Config(vocab_size=vocab, pad_token_id=pad, bos_token_id=bos, eos_token_id=eos, **{**QWEN3, **shape})
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id, model.generation_config.eos_token_id = pad, eos
    return model


def prompts(n: int, seed: int) -> list:
    from opdplus.tasks.base import get_task

    return get_task("contains").items("train", n, seed=seed)


def parameters(model: Any) -> int:
    return sum(p.numel() for p in model.parameters())


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: Any) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_peak(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# ---------------------------------------------------------------- ours


def run_ours(
    args: argparse.Namespace, shape: dict, student: Any, teacher_model: Any, tokenizer: Any, rec: Recorder
) -> dict:
    """``args.warmup + args.steps`` steps of sample -> score -> advantages -> update; per-phase seconds."""
    import torch

    from opdplus.models.forward import HiddenForward
    from opdplus.ops.advantages import advantages
    from opdplus.rollout.fast_sampler import FastSampler
    from opdplus.rollout.sampler import SamplingSettings
    from opdplus.rollout.teacher import LocalTeacher
    from opdplus.train.config import load_config
    from opdplus.train.precision import autocast_for, enable_tf32
    from opdplus.train.schedule import build_optimizer
    from opdplus.train.update import update_policy

    device = args.device
    enable_tf32(device)
    cfg = load_config(None, [f"run.steps={args.warmup + args.steps}", "optim.lr=1.0e-5", "optim.max_grad_norm=1.0"])
    settings = SamplingSettings(max_new_tokens=shape["new_tokens"], samples_per_prompt=1, batch_size=shape["batch"])
    sampler = FastSampler(student, tokenizer, settings, torch.Generator(device=device).manual_seed(0))
    teacher = LocalTeacher(teacher_model, batch_size=shape["teacher_batch"], chunk_size=shape["chunk_tokens"])
    policy = HiddenForward(student)
    optimizer, scheduler = build_optimizer(policy, cfg)
    reset_peak(device)
    steps = []
    for step in range(args.warmup + args.steps):
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        with autocast_for(args.precision, device):
            batch = sampler.sample(prompts(shape["batch"], seed=step))
        sync(device)
        seconds["sample"] = time.perf_counter() - start
        start = time.perf_counter()
        batch.teacher_logprobs_B_T = teacher.score(batch)
        sync(device)
        seconds["score"] = time.perf_counter() - start
        start = time.perf_counter()
        with autocast_for(args.precision, device):
            adv_B_T = advantages(
                batch.sampler_logprobs_B_T,
                batch.teacher_logprobs_B_T,
                batch.loss_mask_B_T,
                divergence="reverse_kl",
                estimator="opd_plus",
            )
            update = update_policy(
                policy,
                optimizer,
                scheduler,
                batch,
                adv_B_T,
                micro_batch_size=shape["micro_batch"],
                clip_eps=None,
                max_grad_norm=1.0,
                chunk_size=shape["chunk_tokens"],
            )
        sync(device)
        seconds["update"] = time.perf_counter() - start
        record = {
            "step": step,
            "warmup": step < args.warmup,
            "tokens": float(batch.loss_mask_B_T.sum()),
            "update_tokens": float(batch.attention_mask_B_T.sum()),
            "loss": update["loss/policy"],
            **seconds,
            "total": sum(seconds.values()),
        }
        rec.phase(f"ours_step_{step}", record)
        steps.append(record)
    return summarize(steps[args.warmup :], parameters(student), device)


def summarize(steps: list[dict], student_params: int, device: Any) -> dict:
    """Tokens/s per phase over the measured steps, peak memory, and the update's MFU."""
    if not steps:
        return {"error": "no measured steps"}
    tokens = sum(s["tokens"] for s in steps)
    out: dict[str, Any] = {
        f"{p}_tok_s": tokens / max(sum(s[p] for s in steps), 1e-9) for p in ("sample", "score", "update", "total")
    }
    out.update(tokens_per_step=tokens / len(steps), steps=len(steps), peak_mem_gb=peak_memory_gb(device))
    update_s, update_tokens = sum(s["update"] for s in steps), sum(s["update_tokens"] for s in steps)
    flops_per_s = 6 * student_params * update_tokens / max(update_s, 1e-9)
    out.update(
        update_tflops=flops_per_s / 1e12,
        mfu_vs_790=flops_per_s / (H200_MEASURED_TFLOPS * 1e12),
        mfu_vs_989=flops_per_s / (H200_DATASHEET_TFLOPS * 1e12),
        step_s=sum(s["total"] for s in steps) / len(steps),
    )
    return out


# ---------------------------------------------------------------- TRL


def run_trl(
    args: argparse.Namespace, shape: dict, student: Any, teacher_model: Any, tokenizer: Any, rec: Recorder
) -> dict:
    """TRL's ``DistillationTrainer`` on the same models; its phases timed by ``loop_vs_trl._TRLTimer``."""
    import tempfile

    import datasets
    from loop_vs_trl import _TRLTimer
    from trl.trainer.distillation_config import DistillationConfig
    from trl.trainer.distillation_trainer import DistillationTrainer

    device = args.device
    total = args.warmup + args.steps
    accumulation = max(1, shape["batch"] // shape["micro_batch"])
    dataset = datasets.Dataset.from_list(
        [{"prompt": item.prompt_text} for step in range(total) for item in prompts(shape["batch"], seed=step)]
    )
    config = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-gpu-"),
        per_device_train_batch_size=shape["batch"] // accumulation,
        gradient_accumulation_steps=accumulation,
        max_steps=total,
        learning_rate=1e-5,
        max_grad_norm=1.0,
        beta=1.0,
        temperature=1.0,
        max_completion_length=shape["new_tokens"],
        bf16=device.type == "cuda",
        gradient_checkpointing=False,
        logging_steps=10_000,
        save_strategy="no",
        report_to="none",
        use_cpu=device.type == "cpu",
        dataloader_num_workers=0,
        seed=0,
        disable_dropout=True,
        shuffle_dataset=False,
    )
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher_model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    timer = _TRLTimer(trainer)
    trainer.add_callback(timer.callback())
    reset_peak(device)
    trainer.train()
    for i, step in enumerate(timer.steps):
        rec.phase(f"trl_step_{i}", {"step": i, "warmup": i < args.warmup, **step})
    return summarize(timer.steps[args.warmup :], parameters(student), device)


# ---------------------------------------------------------------- bf16 vs fp32


def bf16_check(device: Any, tokenizer: Any) -> dict:
    """One update step of a tiny Qwen3 on one fixed batch under fp32 and bf16-mixed: the two losses."""
    import torch

    from opdplus.models.forward import HiddenForward
    from opdplus.ops.advantages import advantages
    from opdplus.rollout.fast_sampler import FastSampler
    from opdplus.rollout.sampler import SamplingSettings
    from opdplus.rollout.teacher import LocalTeacher
    from opdplus.train.config import load_config
    from opdplus.train.precision import autocast_for
    from opdplus.train.schedule import build_optimizer
    from opdplus.train.update import update_policy

    settings = SamplingSettings(max_new_tokens=16, samples_per_prompt=2)
    student = build_model(TINY["student"], TINY["vocab"], tokenizer, device, torch.float32, seed=0)
    teacher = LocalTeacher(build_model(TINY["teacher"], TINY["vocab"], tokenizer, device, torch.float32, seed=1))
    batch = FastSampler(student, tokenizer, settings, torch.Generator(device=device).manual_seed(0)).sample(
        prompts(4, 0)
    )
    batch.teacher_logprobs_B_T = teacher.score(batch)
    adv = advantages(
        batch.sampler_logprobs_B_T,
        batch.teacher_logprobs_B_T,
        batch.loss_mask_B_T,
        divergence="reverse_kl",
        estimator="opd_plus",
    )
    initial = copy.deepcopy(student.state_dict())
    losses = {}
    for precision in ("fp32", "bf16-mixed"):
        student.load_state_dict(initial)
        policy = HiddenForward(student)
        optimizer, scheduler = build_optimizer(policy, load_config(None, []))
        with autocast_for(precision, device):
            losses[precision] = update_policy(policy, optimizer, scheduler, batch, adv, micro_batch_size=3)[
                "loss/policy"
            ]
    rel = abs(losses["bf16-mixed"] - losses["fp32"]) / max(abs(losses["fp32"]), 1e-12)
    return {
        "loss_fp32": losses["fp32"],
        "loss_bf16_mixed": losses["bf16-mixed"],
        "rel_diff": rel,
        "rtol": BF16_LOSS_RTOL,
        "ok": rel <= BF16_LOSS_RTOL,
    }


# ---------------------------------------------------------------- decode paths


def decode_paths(shape: dict, student: Any, tokenizer: Any, args: argparse.Namespace) -> dict:
    """Sampling tokens/s of the fast sampler's decode paths on one batch (the second of two calls each): the
    static decode (a CUDA graph on CUDA), the dynamic one (shapes that change per token, a host read per
    token) and, when asked, the dynamic one under ``torch.compile(dynamic=True)``; same prompts and precision."""
    import torch

    from opdplus.rollout import cuda_decode
    from opdplus.rollout.fast_sampler import FastSampler
    from opdplus.rollout.sampler import SamplingSettings
    from opdplus.train.precision import autocast_for

    settings = SamplingSettings(max_new_tokens=shape["new_tokens"], samples_per_prompt=1, batch_size=shape["batch"])
    graph_decoder = cuda_decode.cuda_decoder_for
    out: dict[str, Any] = {}
    for path in args.decode_paths:
        if path != "static":
            cuda_decode.cuda_decoder_for = lambda sampler: None  # FastSampler.decode asks this module per call
        try:
            generator = torch.Generator(device=args.device).manual_seed(0)
            sampler = FastSampler(student, tokenizer, settings, generator, compile=path == "compiled")
            seconds = []
            for call in range(2):
                start = time.perf_counter()
                with autocast_for(args.precision, args.device):
                    batch = sampler.sample(prompts(shape["batch"], seed=100 + call))
                sync(args.device)
                seconds.append(time.perf_counter() - start)
            out[f"{path}_tok_s"] = float(batch.loss_mask_B_T.sum()) / seconds[-1]
            out[f"{path}_first_call_s"] = seconds[0]
        except Exception as err:  # noqa: BLE001
            out[f"{path}_error"] = f"{type(err).__name__}: {str(err)[:300]}"
        finally:
            cuda_decode.cuda_decoder_for = graph_decoder
    out["static_graph"] = args.device.type == "cuda"
    if "static_tok_s" in out and "dynamic_tok_s" in out:
        out["static_over_dynamic"] = out["static_tok_s"] / out["dynamic_tok_s"]
    return out


# ---------------------------------------------------------------- driver


def side_table(ours: dict[str, Any], theirs: dict[str, Any] | None) -> str:
    keys = (
        "sample_tok_s",
        "score_tok_s",
        "update_tok_s",
        "total_tok_s",
        "peak_mem_gb",
        "update_tflops",
        "mfu_vs_790",
        "mfu_vs_989",
    )
    rows = []
    for key in keys:
        mine, other = ours.get(key), (theirs or {}).get(key)
        rows.append(
            [
                key,
                "-" if mine is None else mine,
                "-" if other is None else other,
                ratio(mine, other) if mine is not None and other else "-",
            ]
        )
    return format_table(["quantity", "ours", "trl", "ours/trl"], rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models on CPU (seconds): checks the script")
    parser.add_argument("--device", default=None, help="default: cuda when available (cpu with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="measured steps per side (default 2; 1 with --tiny)")
    parser.add_argument("--warmup", type=int, default=1, help="steps discarded first (CUDA graphs, autotuning)")
    parser.add_argument("--precision", choices=("fp32", "bf16-mixed"), default="bf16-mixed")
    parser.add_argument("--no-trl", action="store_true", help="only our side")
    parser.add_argument("--out-dir", default=os.environ.get("OUT"), help="where gpu.jsonl goes (default $OUT)")
    parser.add_argument(
        "--decode-paths",
        type=lambda text: [p for p in text.split(",") if p],
        default=["static", "dynamic"],
        help="comma-separated decode paths to time: static, dynamic, compiled (default static,dynamic)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads with --tiny")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import torch

    from opdplus.models.tiny import build_char_tokenizer

    args = parse_args(argv)
    shape = TINY if args.tiny else FULL
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() and not args.tiny else "cpu"))
    args.steps = args.steps if args.steps is not None else (1 if args.tiny else 2)
    if args.device.type == "cpu":
        torch.set_num_threads(args.threads)
    rec = Recorder(args.out_dir)
    started = time.perf_counter()
    tokenizer = build_char_tokenizer()
    teacher_dtype = torch.bfloat16 if args.precision == "bf16-mixed" else torch.float32
    student = build_model(shape["student"], shape["vocab"], tokenizer, args.device, torch.float32, seed=0)
    teacher = build_model(shape["teacher"], shape["vocab"], tokenizer, args.device, teacher_dtype, seed=1)
    initial = {k: v.detach().clone() for k, v in student.state_dict().items()}
    rec.phase(
        "setup",
        {
            "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "student_params": parameters(student),
            "teacher_params": parameters(teacher),
            "batch": shape["batch"],
            "new_tokens": shape["new_tokens"],
            "precision": args.precision,
            "teacher_dtype": str(teacher_dtype).removeprefix("torch."),
            "seconds": time.perf_counter() - started,
        },
    )
    ours: dict[str, Any]
    try:
        ours = run_ours(args, shape, student, teacher, tokenizer, rec)
    except Exception as err:  # noqa: BLE001  (report it; TRL and the checks still run)
        ours = {"error": f"{type(err).__name__}: {str(err)[:500]}", "traceback": traceback.format_exc()[-2000:]}
    rec.phase("ours", ours)
    theirs: dict[str, Any] | None = None
    if not args.no_trl:
        student.load_state_dict(initial)  # TRL starts from the same weights
        del initial
        try:
            theirs = run_trl(args, shape, student, teacher, tokenizer, rec)
        except ImportError as err:  # no trl / datasets on this machine: our side stands alone
            theirs = {"error": f"TRL did not import: {err}"}
        except Exception as err:  # noqa: BLE001  (e.g. out of memory: report it, keep our numbers)
            theirs = {"error": f"{type(err).__name__}: {str(err)[:500]}"}
        rec.phase("trl", theirs)
    rec.phase("bf16_check", bf16_check(args.device, tokenizer))
    rec.phase("decode_paths", decode_paths(shape, student, tokenizer, args))
    rec.result["ratios"] = {
        key: ratio(ours[key], theirs[key]) if theirs and key in theirs and ours.get(key) is not None else None
        for key in ("sample_tok_s", "score_tok_s", "update_tok_s", "total_tok_s", "peak_mem_gb")
    }
    rec.phase("done", {"seconds": time.perf_counter() - started, "ratios": rec.result["ratios"]})
    print(
        f"bench/gpu.py on {rec.result['setup']['device']}: student {parameters(student) / 1e6:.0f}M, teacher "
        f"{parameters(teacher) / 1e6:.0f}M, vocab {shape['vocab']}, {shape['batch']} prompts x {shape['new_tokens']} "
        f"new tokens, {args.precision}, {args.steps} measured step(s) after {args.warmup} warm-up"
    )
    if "error" in ours:
        print(f"ours: {ours['error']}")
    print(side_table(ours, theirs if theirs and "error" not in theirs else None))
    print(f"decode paths (sampling tok/s): {json.dumps(rec.result['decode_paths'])}")
    if theirs and "error" in theirs:
        print(f"trl: {theirs['error']}")
    print(f"bf16 vs fp32 (tiny model, one update step): {json.dumps(rec.result['bf16_check'])}")
    emit("gpu", rec.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
