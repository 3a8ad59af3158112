"""The training loop, top to bottom: sample -> score -> advantages -> loss -> optimizer step -> log ->
eval -> checkpoint. ``train(cfg)`` is the whole of it; the helpers above it are small and testable.
"""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from opdplus.models.forward import HiddenForward, completion_logprobs, hidden_forward_of, softcapped
from opdplus.models.load import (
    apply_lora,
    check_same_vocabulary,
    load_lora_weights,
    load_model_and_tokenizer,
    resolve_device,
)
from opdplus.ops.advantages import advantages as compute_advantages
from opdplus.ops.advantages import log_ratio_clip_fraction, masked_log_ratio
from opdplus.ops.chunked import chunked_exact_divergence, chunked_topk_divergence
from opdplus.ops.divergences import Divergence, get_divergence
from opdplus.ops.logprobs import shifted_completion_logprobs
from opdplus.ops.loss import policy_loss, ratio_clip_fraction
from opdplus.ops.signals import per_position_divergence_loss
from opdplus.rollout.sampler import Sampler, SamplingSettings, tokenize_prompts
from opdplus.rollout.teacher import LocalTeacher
from opdplus.rollout.types import RolloutBatch, Teacher
from opdplus.tasks.base import Task, TaskItem, get_task
from opdplus.train import checkpoint as ckpt
from opdplus.train import distributed as dist_utils
from opdplus.train.config import (
    ConfigError,
    LossConfig,
    TeacherConfig,
    TrainConfig,
    divergence_kwargs,
    to_dict,
    to_yaml,
)
from opdplus.train.distributed import DistContext
from opdplus.train.evaluate import evaluate
from opdplus.train.metrics import (
    MetricsWriter,
    count_loss_tokens,
    masked_mean,
    masked_stats,
    peak_memory_mb,
    read_metrics,
    reset_peak_memory,
    truncate_metrics,
)


class RunDirError(RuntimeError):
    """The run directory exists (without --resume / --overwrite) or cannot be resumed."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]  # the last step's metrics, including its eval when there was one
    checkpoint: Path | None


# ---------------------------------------------------------------- building blocks


def build_student(cfg: TrainConfig, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The student model (LoRA-wrapped when enabled) and its tokenizer."""
    s = cfg.student
    model, tokenizer = load_model_and_tokenizer(
        s.model, tokenizer=s.tokenizer, dtype=s.dtype, device=device, tiny=dataclasses.asdict(s.tiny)
    )
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if s.lora.enabled:
        model = apply_lora(
            model, r=s.lora.r, alpha=s.lora.alpha, dropout=s.lora.dropout, target_modules=s.lora.target_modules
        )
    return model, tokenizer


def build_teacher(
    cfg: TrainConfig, student_tokenizer: Any, student_model: torch.nn.Module, device: torch.device
) -> Teacher:
    """The teacher that scores rollouts: ``teacher`` (a local HF model, or a served one when
    ``teacher.url`` is set), or with a ``teachers:`` list one teacher per task tag, routed by row."""
    if not cfg.teachers:
        return build_one_teacher(cfg.teacher, cfg, student_tokenizer, student_model, device)
    from opdplus.rollout.routing import RoutedTeacher

    return RoutedTeacher(
        {
            route.task: build_one_teacher(route.teacher, cfg, student_tokenizer, student_model, device)
            for route in cfg.teachers
        }
    )


def build_one_teacher(
    t: TeacherConfig, cfg: TrainConfig, student_tokenizer: Any, student_model: torch.nn.Module, device: torch.device
) -> Teacher:
    """A ``LocalTeacher`` (vocabulary checked against the student) or an ``HTTPTeacher`` for ``t.url``."""
    if t.url is not None:
        import os

        from opdplus.rollout.http_teacher import HTTPTeacher

        return HTTPTeacher(
            t.url,
            api_key=os.environ.get(t.api_key_env),
            model=t.model_name,
            timeout_s=t.timeout_s,
            max_retries=t.max_retries,
            max_concurrency=t.max_concurrency,
            rows_per_request=t.rows_per_request,
        )
    model, tokenizer = load_model_and_tokenizer(
        t.model,
        tokenizer=t.tokenizer,
        dtype=t.dtype,
        device=resolve_device(t.device) if t.device else device,
        tiny=dataclasses.asdict(t.tiny),
    )
    try:
        check_same_vocabulary(student_tokenizer, tokenizer, student_model, model)
    except ValueError as err:
        raise ConfigError(f"student.model={cfg.student.model!r}, teacher.model={t.model!r}: {err}") from None
    return LocalTeacher(model, batch_size=t.batch_size, chunk_size=cfg.loss.logprob_chunk_size)


def build_tasks(cfg: TrainConfig, tokenizer: Any) -> dict[str, Task]:
    """Tasks by name; renders one prompt of each so a missing chat template fails before training, and
    with a ``teachers:`` list checks that every task's tag has a teacher."""
    tasks = {}
    routed = {route.task for route in cfg.teachers}
    for name in cfg.data.tasks:
        try:
            tasks[name] = get_task(name, **cfg.data.task_options.get(name, {}))
            (item,) = tasks[name].items("train", 1, seed=cfg.run.seed)
            tokenize_prompts(tokenizer, [item])
        except ValueError as err:
            raise ConfigError(f"data.tasks: task {name!r}: {err}") from None
        if routed and item.task not in routed:
            raise ConfigError(
                f"data.tasks: task {name!r} makes rollouts tagged {item.task!r}, but teachers: has "
                f"entries only for {sorted(routed)}; add {{task: {item.task}, teacher: ...}}"
            )
    return tasks


def build_divergence(loss: LossConfig) -> Divergence:
    return get_divergence(loss.divergence, **divergence_kwargs(loss))


def sampling_settings(cfg: TrainConfig) -> SamplingSettings:
    r = cfg.rollout
    return SamplingSettings(
        max_new_tokens=r.max_new_tokens,
        samples_per_prompt=r.samples_per_prompt,
        temperature=r.temperature,
        top_k=r.top_k,
        top_p=r.top_p,
        batch_size=r.batch_size,
    )


def sampler_class(name: str) -> type:
    """``hf``: HF ``generate`` (the reference); ``fast``: our decode loop. Both give the same ``RolloutBatch``."""
    if name == "fast":
        from opdplus.rollout.fast_sampler import FastSampler

        return FastSampler
    return Sampler


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_optimizer(
    model: torch.nn.Module, cfg: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters (3-11x faster steps on CPU, bench/flops.py); not for FSDP's DTensors
    fused = not dist_utils.is_fsdp(model) and all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused
    )
    total = cfg.run.steps * cfg.loss.ppo_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, warmup_steps=o.warmup_steps, total_steps=total, schedule=o.schedule, min_lr_ratio=o.min_lr_ratio
        ),
    )
    return optimizer, scheduler


def prompts_for_step(tasks: dict[str, Task], prompts_per_step: int, seed: int, step: int) -> list[TaskItem]:
    """This step's training items, a pure function of (seed, step): resuming needs no data state.
    Prompts are shared evenly between tasks."""
    names = list(tasks)
    shares = [prompts_per_step // len(names) + (i < prompts_per_step % len(names)) for i in range(len(names))]
    return [
        item
        for i, (name, share) in enumerate(zip(names, shares))
        if share
        for item in tasks[name].items("train", share, seed=(seed * 1_000_003 + step) * 1_009 + i)
    ]


# ---------------------------------------------------------------- one update


def micro_batch_slices(batch_size: int, micro_batch_size: int) -> list[slice]:
    return [slice(i, min(i + micro_batch_size, batch_size)) for i in range(0, batch_size, micro_batch_size)]


def trim_right_padding(batch: RolloutBatch) -> RolloutBatch:
    """Drop trailing columns where no row has a real token (saves work on short micro-batches)."""
    width = int(batch.attention_mask_B_T.any(0).nonzero().max()) + 1
    width = max(width, batch.prompt_len)
    if width == batch.input_ids_B_T.shape[1]:
        return batch
    return batch.columns(width)


@torch.no_grad()
def student_logprobs_no_grad(
    model: torch.nn.Module, batch: RolloutBatch, *, micro_batch_size: int, chunk_size: int
) -> torch.Tensor:
    """log pi_theta of the batch's tokens at the current weights (0 off the loss mask), [B, T]."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    parts = []
    for rows in micro_batch_slices(batch.batch_size, micro_batch_size):
        mb = batch.select(rows).to(device)
        lp = completion_logprobs(model, mb.input_ids_B_T, mb.attention_mask_B_T, mb.prompt_len, chunk_size=chunk_size)
        parts.append(lp.where(mb.loss_mask_B_T, 0.0).cpu())
    model.train(was_training)
    return torch.cat(parts).to(batch.input_ids_B_T.device)


@dataclass(frozen=True)
class TeacherSignal:
    """A per-position teacher signal (``loss.teacher_signal`` topk / exact): the loss is the divergence
    over the teacher's top-k plus a tail bucket, or over the full vocabulary, differentiated directly,
    plus a policy-gradient term for the future positions when gamma > 0 (DESIGN.md horizon rule)."""

    kind: str  # "topk" (needs batch.teacher_topk_*) | "exact" (needs a LocalTeacher)
    divergence: Divergence
    gamma: float = 0.0
    teacher: Any = None


def signal_divergence(
    model: torch.nn.Module, mb: RolloutBatch, signal: TeacherSignal, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(student_logprobs_B_T, divergence_B_T) of a micro-batch from one student forward; both 0 before
    the completion. The LM heads run in chunks of positions (never a full [B, T, V] tensor)."""
    policy = hidden_forward_of(model)
    if policy is None:
        raise ValueError("teacher_signal topk / exact needs the student wrapped in HiddenForward")
    start = mb.prompt_len
    hidden_B_T_H = model(mb.input_ids_B_T, mb.attention_mask_B_T)
    student_lp_B_T = shifted_completion_logprobs(
        hidden_B_T_H, policy.head, mb.input_ids_B_T, start, chunk_size=chunk_size, logit_softcap=policy.softcap
    )
    student_head = softcapped(policy.head, policy.softcap)
    hidden_B_C_H = hidden_B_T_H[:, start - 1 : -1]
    if signal.kind == "exact":
        teacher_hidden_B_T_H, teacher_head = signal.teacher.hidden_states(mb)
        divergence_B_C = chunked_exact_divergence(
            hidden_B_C_H,
            student_head,
            teacher_hidden_B_T_H[:, start - 1 : -1].to(hidden_B_C_H.device),
            teacher_head,
            signal.divergence,
            chunk_size=chunk_size,
        )
    else:
        divergence_B_C = chunked_topk_divergence(
            hidden_B_C_H,
            student_head,
            mb.teacher_topk_ids_B_T_K[:, start:],
            mb.teacher_topk_logprobs_B_T_K[:, start:],
            signal.divergence,
            chunk_size=chunk_size,
        )
    divergence_B_T = torch.cat([divergence_B_C.new_zeros(mb.batch_size, start), divergence_B_C.float()], dim=1)
    return student_lp_B_T, divergence_B_T


def update_policy(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    batch: RolloutBatch,
    advantages_B_T: torch.Tensor,
    *,
    ppo_epochs: int = 1,
    micro_batch_size: int = 8,
    clip_eps: float | None = None,
    max_grad_norm: float | None = None,
    chunk_size: int = 256,
    signal: TeacherSignal | None = None,
    ctx: DistContext = DistContext(),
) -> dict[str, float]:
    """``ppo_epochs`` optimizer steps on ``batch``; each accumulates gradients over micro-batches with the
    number of loss tokens in the whole step (summed over all processes) as the normalizer, so neither
    the micro-batch size nor the number of processes changes the update. DDP / FSDP average gradients
    over processes, so the loss is multiplied by the world size. With a ``signal`` the loss is the
    per-position divergence loss and ``advantages_B_T`` is unused."""
    device = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    normalizer = max(dist_utils.all_reduce_sum(count_loss_tokens(batch.loss_mask_B_T), ctx), 1.0)
    model.train()
    losses, grad_norms, clip_fracs, lrs, signal_values, skipped = [], [], [], [], [], 0
    for _ in range(ppo_epochs):
        optimizer.zero_grad(set_to_none=True)
        loss_sum, clipped, signal_sum = 0.0, 0.0, 0.0
        for rows in micro_batch_slices(batch.batch_size, micro_batch_size):
            mb = trim_right_padding(batch.select(rows)).to(device)
            adv_B_T = advantages_B_T[rows, : mb.input_ids_B_T.shape[1]].to(device)
            if signal is None:
                student_lp_B_T = completion_logprobs(
                    model, mb.input_ids_B_T, mb.attention_mask_B_T, mb.prompt_len, chunk_size=chunk_size
                )
                loss = policy_loss(
                    student_lp_B_T,
                    mb.sampler_logprobs_B_T,
                    adv_B_T,
                    mb.loss_mask_B_T,
                    clip_eps=clip_eps,
                    normalizer=normalizer,
                )
            else:
                student_lp_B_T, divergence_B_T = signal_divergence(model, mb, signal, chunk_size)
                loss = per_position_divergence_loss(
                    divergence_B_T,
                    student_lp_B_T,
                    mb.sampler_logprobs_B_T,
                    mb.loss_mask_B_T,
                    gamma=signal.gamma,
                    clip_eps=clip_eps,
                    normalizer=normalizer,
                )
                signal_sum += float(torch.where(mb.loss_mask_B_T, divergence_B_T.detach(), 0.0).sum())
            (loss * ctx.world_size).backward()
            loss_sum += float(loss.detach())
            if clip_eps is not None:
                frac = ratio_clip_fraction(student_lp_B_T, mb.sampler_logprobs_B_T, adv_B_T, mb.loss_mask_B_T, clip_eps)
                clipped += float(frac) * count_loss_tokens(mb.loss_mask_B_T)
        grad_norm = dist_utils.total_grad_norm(params, max_grad_norm)
        lrs.append(optimizer.param_groups[0]["lr"])
        if math.isfinite(grad_norm):
            optimizer.step()
        else:
            skipped += 1  # never apply a NaN/inf update; the step still counts for the schedule
        scheduler.step()
        losses.append(dist_utils.all_reduce_sum(loss_sum, ctx))
        grad_norms.append(grad_norm)
        clip_fracs.append(dist_utils.all_reduce_sum(clipped, ctx) / normalizer)
        signal_values.append(dist_utils.all_reduce_sum(signal_sum, ctx) / normalizer)
    optimizer.zero_grad(set_to_none=True)
    metrics = {
        "loss/policy": losses[0],
        "loss/policy_last_epoch": losses[-1],
        "loss/grad_norm": sum(grad_norms) / len(grad_norms),
        "loss/lr": lrs[0],
        "loss/ratio_clip_frac": sum(clip_fracs) / len(clip_fracs),
        "loss/skipped_steps": float(skipped),
    }
    if signal is not None:  # the per-position divergence the loss used, per loss token, before the update
        metrics[f"div/{signal.divergence.name}_{signal.kind}"] = signal_values[0]
    return metrics


# ---------------------------------------------------------------- per-step metrics


def divergence_metrics(
    divergence: Divergence,
    student_lp_B_T: torch.Tensor,
    teacher_lp_B_T: torch.Tensor,
    loss_mask_B_T: torch.Tensor,
    log_ratio_clip: float | None,
) -> dict[str, float]:
    """Sampled-token estimates (per token) of the chosen divergence D_f(q || pi) and of KL(pi || q)."""
    log_ratio_B_T = masked_log_ratio(student_lp_B_T, teacher_lp_B_T, loss_mask_B_T, log_ratio_clip).double()
    f_B_T = divergence.f(divergence.safe_log_ratio(log_ratio_B_T))
    raw_B_T = masked_log_ratio(student_lp_B_T, teacher_lp_B_T, loss_mask_B_T)
    return {
        f"div/{divergence.name}": masked_mean(f_B_T, loss_mask_B_T),
        "div/reverse_kl": masked_mean(-raw_B_T, loss_mask_B_T),
        "adv/log_ratio_clip_frac": float(
            log_ratio_clip_fraction(student_lp_B_T, teacher_lp_B_T, loss_mask_B_T, log_ratio_clip)
        ),
    }


def rollout_metrics(batch: RolloutBatch) -> dict[str, float]:
    lengths_B = batch.completion_lengths_B().double()
    truncated_B = (
        batch.truncated_B if batch.truncated_B is not None else torch.zeros(batch.batch_size, dtype=torch.bool)
    )
    return {
        "rollout/len_mean": float(lengths_B.mean()),
        "rollout/len_max": float(lengths_B.max()),
        "rollout/truncated_frac": float(truncated_B.double().mean()),
        "rollout/tokens": float(lengths_B.sum()),
        "rollout/sequences": float(batch.batch_size),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- RNG and run directory


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "sampler": generator.get_state(),
    }


def restore_rng(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["sampler"])


def check_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    """Raise RunDirError unless the run directory can be used as asked (reads only)."""
    run_dir = Path(cfg.run.dir)
    if resume:
        if not (run_dir / "config.yaml").is_file():
            raise RunDirError(f"cannot resume {run_dir}: it has no config.yaml (not a run directory)")
    elif run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise RunDirError(
            f"run directory {run_dir} already exists; pass --resume {run_dir} to continue it or --overwrite "
            "to start over (its contents are deleted)"
        )
    return run_dir


def prepare_run_dir(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Path:
    run_dir = check_run_dir(cfg, resume=resume, overwrite=overwrite)
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
    return run_dir


def save_student(
    model: torch.nn.Module, tokenizer: Any, directory: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """HF ``save_pretrained`` layout with safetensors (for LoRA: the peft adapter) plus the tokenizer.
    ``state_dict`` gives the weights when they are sharded over processes (FSDP)."""
    model.save_pretrained(directory, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(directory)


def load_student_weights(model: torch.nn.Module, directory: Path, *, lora: bool) -> None:
    if lora:
        load_lora_weights(model, directory)
        return
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())


def rank_seed(seed: int, rank: int) -> int:
    """Each process samples with its own stream; rank 0 keeps the single-process seed."""
    return seed + 7919 * rank


def write_checkpoint(
    cfg: TrainConfig,
    step: int,
    policy: torch.nn.Module,
    student: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    ctx: DistContext = DistContext(),
) -> Path:
    """Gather weights, optimizer state (keyed by parameter name, unsharded) and every rank's RNG state;
    rank 0 writes the checkpoint. All ranks must call it (FSDP gathers collectively)."""
    sharded = dist_utils.is_fsdp(policy)
    weights = dist_utils.full_model_state_dict(policy) if sharded else None
    optimizer_state = dist_utils.full_optimizer_state_dict(policy, optimizer)
    rng_per_rank = dist_utils.all_gather_objects(capture_rng(generator), ctx)
    path = ckpt.checkpoint_dir(Path(cfg.run.dir), step)
    if ctx.is_main:
        hf_weights = None if weights is None else {k.removeprefix("model."): v for k, v in weights.items()}
        path = ckpt.save_checkpoint(
            Path(cfg.run.dir),
            step,
            write_model=lambda d: save_student(student, tokenizer, d, state_dict=hf_weights),
            trainer_state={
                "step": step,
                "optimizer": optimizer_state,
                "scheduler": scheduler.state_dict(),
                "rng": rng_per_rank[0],
                "rng_per_rank": rng_per_rank,
                "world_size": ctx.world_size,
            },
            config_yaml=to_yaml(cfg),
            keep=cfg.run.keep_checkpoints,
        )
    dist_utils.barrier(ctx)
    return path


def load_checkpoint_weights(
    run_dir: Path, student: torch.nn.Module, *, lora: bool, ctx: DistContext = DistContext()
) -> tuple[Path | None, dict[str, Any] | None]:
    """Load the newest (verified) checkpoint's weights into the unwrapped student; returns the
    checkpoint and its trainer state. Rank 0 first removes leftovers of an interrupted save."""
    if ctx.is_main:
        ckpt.remove_temp_dirs(run_dir)
    dist_utils.barrier(ctx)
    checkpoint = ckpt.latest_checkpoint(run_dir)
    if checkpoint is None:
        return None, None
    load_student_weights(student, checkpoint / "model", lora=lora)
    return checkpoint, ckpt.load_trainer_state(checkpoint)


def restore_trainer_state(
    state: dict[str, Any],
    policy: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    generator: torch.Generator,
    *,
    seed: int,
    ctx: DistContext = DistContext(),
) -> int:
    """Optimizer, schedule and RNG from a checkpoint (written by any number of processes); returns its step.
    With the same number of processes every rank gets its own RNG state back (an exact continuation);
    with another number, rank 0 does and the others re-seed from (seed, step, rank)."""
    dist_utils.load_full_optimizer_state_dict(policy, optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    step = int(state["step"])
    rngs = state.get("rng_per_rank") or [state["rng"]]
    if len(rngs) == ctx.world_size:
        restore_rng(rngs[ctx.rank], generator)
    elif ctx.is_main:
        restore_rng(rngs[0], generator)
    else:
        reseed = rank_seed(seed * 1_000_003 + step, ctx.rank)
        seed_everything(reseed)
        generator.manual_seed(reseed)
    return step


class _NoWriter:
    """Metrics sink of ranks other than 0."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def message(self, text: str) -> None: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- the loop


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> TrainResult:
    """Distil ``cfg.teacher`` into ``cfg.student``; writes config.yaml, metrics.jsonl and checkpoints into
    ``cfg.run.dir``. With ``resume=True`` it continues from the newest checkpoint there."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    threads = torch.get_num_threads()
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    try:
        return _train(cfg, resume=resume, overwrite=overwrite)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, *, resume: bool, overwrite: bool) -> TrainResult:
    ctx, device = dist_utils.init_distributed(resolve_device(cfg.run.device), cfg.train.parallelism)
    try:
        result = _train_processes(cfg, ctx, device, resume=resume, overwrite=overwrite)
    except BaseException:
        dist_utils.shutdown(ctx, wait_for_others=False)  # the other ranks may never reach a barrier
        raise
    dist_utils.shutdown(ctx)
    return result


def _train_processes(
    cfg: TrainConfig, ctx: DistContext, device: torch.device, *, resume: bool, overwrite: bool
) -> TrainResult:
    if cfg.data.prompts_per_step % ctx.world_size:
        raise ConfigError(
            f"data.prompts_per_step={cfg.data.prompts_per_step} must be divisible by the number of "
            f"processes ({ctx.world_size}) so that every process gets the same share"
        )
    run_dir = check_run_dir(cfg, resume=resume, overwrite=overwrite)
    dist_utils.barrier(ctx)
    if ctx.is_main:
        prepare_run_dir(cfg, resume=resume, overwrite=overwrite)
    dist_utils.barrier(ctx)
    seed_everything(cfg.run.seed)

    student, tokenizer = build_student(cfg, device)
    teacher = build_teacher(cfg, tokenizer, student, device)
    tasks = build_tasks(cfg, tokenizer)
    divergence = build_divergence(cfg.loss)
    last_checkpoint, state = (
        load_checkpoint_weights(run_dir, student, lora=cfg.student.lora.enabled, ctx=ctx) if resume else (None, None)
    )
    policy = dist_utils.wrap_model(HiddenForward(student), ctx, device)
    optimizer, scheduler = build_optimizer(policy, cfg)
    generator = torch.Generator(device=device).manual_seed(rank_seed(cfg.run.seed, ctx.rank))
    settings = sampling_settings(cfg)
    sampler = sampler_class(cfg.rollout.sampler)(student, tokenizer, settings, generator)
    signal = (
        None
        if cfg.loss.teacher_signal == "sampled"
        else TeacherSignal(cfg.loss.teacher_signal, divergence, cfg.loss.gamma, teacher)
    )
    eval_tokens = cfg.eval.max_new_tokens or cfg.rollout.max_new_tokens

    start_step = 0
    if state is not None:
        start_step = restore_trainer_state(state, policy, optimizer, scheduler, generator, seed=cfg.run.seed, ctx=ctx)
    if ctx.is_main and resume:
        truncate_metrics(run_dir, start_step)
    dist_utils.barrier(ctx)

    writer = (
        MetricsWriter(
            run_dir,
            total_steps=cfg.run.steps,
            start_step=start_step,
            progress=cfg.run.progress,
            log_every=cfg.run.log_every,
            tensorboard=cfg.run.tensorboard,
            wandb=cfg.run.wandb,
            wandb_project=cfg.run.wandb_project,
            config=to_dict(cfg),
        )
        if ctx.is_main
        else _NoWriter()
    )
    if resume:
        writer.message(f"resuming {run_dir} from {last_checkpoint or 'the start (no checkpoint)'} at step {start_step}")
    if ctx.enabled:
        writer.message(f"{ctx.world_size} processes, {cfg.train.parallelism}")
    previous = read_metrics(run_dir)  # a resumed run that has nothing left to do still reports its last step
    metrics: dict[str, float] = {k: v for k, v in previous[-1].items() if k not in ("step", "time")} if previous else {}

    def held_out() -> dict[str, float]:
        t0 = time.perf_counter()
        with dist_utils.gathered(policy):  # a collective under FSDP: every rank evaluates
            result = evaluate(
                student,
                tokenizer,
                teacher,
                tasks,
                num_prompts=cfg.eval.num_prompts,
                max_new_tokens=eval_tokens,
                seed=cfg.eval.seed,
                batch_size=cfg.rollout.batch_size,
                score_decoding=cfg.eval.score_decoding,
                sampler_cls=sampler_class(cfg.rollout.sampler),
                forward_kl=cfg.eval.forward_kl,
            )
        return {**result, "perf/eval_s": time.perf_counter() - t0}

    try:
        if cfg.eval.at_start and start_step == 0 and not previous:
            metrics = held_out()
            writer.log(0, metrics)  # step 0: the starting policy
        for step in range(start_step + 1, cfg.run.steps + 1):
            reset_peak_memory(device)
            t0 = time.perf_counter()
            items = dist_utils.shard_for_rank(
                prompts_for_step(tasks, cfg.data.prompts_per_step, cfg.run.seed, step), ctx
            )
            with dist_utils.gathered(policy):
                batch = sampler.sample(items)
            _sync(device)
            t1 = time.perf_counter()
            batch.teacher_logprobs_B_T = teacher.score(batch)
            if cfg.loss.teacher_signal == "topk":
                batch.teacher_topk_ids_B_T_K, batch.teacher_topk_logprobs_B_T_K = teacher.score_topk(
                    batch, cfg.loss.topk
                )
            _sync(device)
            t2 = time.perf_counter()
            # Advantages use the log-probs of the policy that sampled; with temperature / top-k / top-p
            # the sampler's distribution is not the student's, so recompute pi_theta for the divergence.
            if settings.is_untempered:
                rollout_student_lp = batch.sampler_logprobs_B_T
            else:
                with dist_utils.gathered(policy):
                    rollout_student_lp = student_logprobs_no_grad(
                        student,
                        batch,
                        micro_batch_size=cfg.loss.micro_batch_size,
                        chunk_size=cfg.loss.logprob_chunk_size,
                    )
            advantages_B_T = compute_advantages(
                rollout_student_lp,
                batch.teacher_logprobs_B_T,
                batch.loss_mask_B_T,
                divergence=divergence,
                estimator=cfg.loss.estimator,
                gamma=cfg.loss.gamma,
                log_ratio_clip=cfg.loss.log_ratio_clip,
            )
            update = update_policy(
                policy,
                optimizer,
                scheduler,
                batch,
                advantages_B_T,
                ppo_epochs=cfg.loss.ppo_epochs,
                micro_batch_size=cfg.loss.micro_batch_size,
                clip_eps=cfg.loss.clip_eps,
                max_grad_norm=cfg.optim.max_grad_norm,
                chunk_size=cfg.loss.logprob_chunk_size,
                signal=signal,
                ctx=ctx,
            )
            _sync(device)
            t3 = time.perf_counter()

            tokens = float(count_loss_tokens(batch.loss_mask_B_T))
            metrics = {
                **update,
                **divergence_metrics(
                    divergence,
                    rollout_student_lp,
                    batch.teacher_logprobs_B_T,
                    batch.loss_mask_B_T,
                    cfg.loss.log_ratio_clip,
                ),
                **per_task_reverse_kl(rollout_student_lp, batch),
                **{f"adv/{k}": v for k, v in masked_stats(advantages_B_T, batch.loss_mask_B_T).items()},
                **rollout_metrics(batch),
                **{f"perf/{k}": v for k, v in teacher_usage(teacher).items()},
                "perf/sample_tok_s": tokens / max(t1 - t0, 1e-9),
                "perf/score_tok_s": tokens / max(t2 - t1, 1e-9),
                "perf/update_tok_s": tokens * cfg.loss.ppo_epochs / max(t3 - t2, 1e-9),
                "perf/step_s": t3 - t0,
                "perf/peak_mem_mb": peak_memory_mb(device),
            }
            metrics = dist_utils.reduce_metrics(metrics, ctx, weight=tokens)
            if (cfg.eval.every and step % cfg.eval.every == 0) or (cfg.eval.at_end and step == cfg.run.steps):
                metrics.update(held_out())
            writer.log(step, metrics)
            if (cfg.run.checkpoint_every and step % cfg.run.checkpoint_every == 0) or step == cfg.run.steps:
                last_checkpoint = write_checkpoint(
                    cfg, step, policy, student, tokenizer, optimizer, scheduler, generator, ctx
                )
    finally:
        writer.close()
    return TrainResult(run_dir=run_dir, step=cfg.run.steps, metrics=metrics, checkpoint=last_checkpoint)


def per_task_reverse_kl(student_lp_B_T: torch.Tensor, batch: RolloutBatch) -> dict[str, float]:
    """``div/<task>/reverse_kl`` per task tag (so each routed teacher has its own), when there are several."""
    tags = sorted(set(batch.tasks))
    if len(tags) < 2:
        return {}
    out = {}
    for tag in tags:
        rows_B = torch.tensor([t == tag for t in batch.tasks])
        mask_B_T = batch.loss_mask_B_T & rows_B[:, None].to(batch.loss_mask_B_T.device)
        out[f"div/{tag}/reverse_kl"] = masked_mean(student_lp_B_T - batch.teacher_logprobs_B_T, mask_B_T)
    return out


def teacher_usage(teacher: Teacher) -> dict[str, float]:
    """The teacher's counters for this step, ``teacher/...``: per task for a routed teacher
    (``teacher/<task>/{rows,tokens,seconds}``), requests and retries for a served one; reset each step."""
    usage = getattr(teacher, "metrics", None)
    return {} if usage is None else {f"teacher/{k}": float(v) for k, v in usage(reset=True).items()}
