"""The optimizer (AdamW) and its learning-rate schedule: linear warmup, then constant, linear or cosine decay."""

from __future__ import annotations

import math

import torch

import opdplus.train.distributed as dist_utils
from opdplus.train.config import TrainConfig


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
    """AdamW over the trainable parameters and a per-optimizer-step schedule (``update.ppo_epochs`` steps per
    training step)."""
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    # fused: one kernel over all parameters (3-11x faster steps on CPU, bench/flops.py); not for FSDP's DTensors
    fused = not dist_utils.is_fsdp(model) and all(p.device.type in ("cpu", "cuda") for p in params)
    optimizer = torch.optim.AdamW(
        params, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps, weight_decay=o.weight_decay, fused=fused
    )
    total = cfg.run.steps * cfg.update.ppo_epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, warmup_steps=o.warmup_steps, total_steps=total, schedule=o.schedule, min_lr_ratio=o.min_lr_ratio
        ),
    )
    return optimizer, scheduler
