"""The trainer's state across processes and restarts: RNG streams, and checkpoints of weights, optimizer,
schedule and RNG (the file format is in checkpoint.py)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

import opdplus.train.checkpoint as ckpt
import opdplus.train.distributed as dist_utils
from opdplus.models.load import load_lora_weights
from opdplus.train.config import TrainConfig, to_yaml
from opdplus.train.distributed import DistContext
from opdplus.train.run_dir import RUN_META, remove_replaced_runs

# ---------------------------------------------------------------- RNG


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Each process samples with its own stream; rank 0 keeps the single-process seed."""
    return seed + 7919 * rank


def capture_rng(generator: torch.Generator) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    assert isinstance(keys, np.ndarray)
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


# ---------------------------------------------------------------- student weights


def save_student(
    model: torch.nn.Module, tokenizer: Any, directory: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """HF ``save_pretrained`` layout with safetensors (for LoRA: the peft adapter) plus the tokenizer.
    ``state_dict`` gives the weights when they are sharded over processes (FSDP)."""
    pretrained: Any = model  # a transformers or peft model
    pretrained.save_pretrained(directory, **({"state_dict": state_dict} if state_dict is not None else {}))
    tokenizer.save_pretrained(directory)


def load_student_weights(model: torch.nn.Module, directory: Path, *, lora: bool) -> None:
    if lora:
        load_lora_weights(model, directory)
        return
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=next(model.parameters()).dtype)
    model.load_state_dict(saved.state_dict())


# ---------------------------------------------------------------- checkpoints


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
    meta: dict[str, Any] | None = None,
) -> Path:
    """Gather weights, optimizer state (keyed by parameter name, unsharded) and every rank's RNG state;
    rank 0 writes the checkpoint (with the run metadata ``meta``) and then deletes an old run that
    ``--overwrite`` moved aside. All ranks must call it (FSDP gathers collectively)."""
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
            extra_files={RUN_META: json.dumps(meta, indent=1)} if meta is not None else None,
        )
        remove_replaced_runs(Path(cfg.run.dir))
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
