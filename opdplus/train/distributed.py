"""Multi-process training on PyTorch's own engine: process group, DDP / FSDP2 wrapping, reductions,
and full (world-size independent) state dicts for checkpoints.

Started by ``torchrun --nproc_per_node N -m opdplus train ...`` (or ``opdplus train --nproc N``): each
rank samples and scores its share of the step's prompts, the update divides by the number of loss
tokens summed over all ranks, and rank 0 writes metrics and checkpoints. nccl on CUDA, gloo on CPU.
DDP and FSDP2 average gradients over ranks; the loss is multiplied by the world size so that the
update is the single-process update on the global batch.
"""

from __future__ import annotations

import math
import os
import time
import typing
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
import torch.distributed as dist

ParallelMode = Literal["ddp", "fsdp"]  # used when launched with several processes
PARALLELISMS: tuple[str, ...] = typing.get_args(ParallelMode)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallelism: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device, parallelism: str = "ddp") -> tuple[DistContext, torch.device]:
    """Join the process group torchrun set up (WORLD_SIZE > 1); otherwise a single-process context.

    On CUDA each rank takes ``cuda:LOCAL_RANK`` and nccl; on CPU, gloo.
    """
    if parallelism not in PARALLELISMS:
        raise ValueError(f"parallel.mode must be one of {', '.join(PARALLELISMS)}, got {parallelism!r}")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext(parallelism=parallelism), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(process_group_backend(device))
    return DistContext(rank, world_size, local_rank, parallelism), device


def process_group_backend(device: torch.device) -> str:
    """The collective backend for ``device``: nccl for CUDA (DDP and FSDP2 on GPUs), gloo for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def shutdown(ctx: DistContext, *, wait_for_others: bool = True) -> None:
    """Leave the process group without a hang at exit.

    gloo's worker threads free finished collectives, which needs the GIL, and the process group's
    destructor joins those threads while holding the GIL: tearing it down while a worker is still
    freeing an all-reduce deadlocks (seen with DDP on CPU, 3 runs in 12). So every rank first meets the
    others at a barrier (skipped with ``wait_for_others=False``, on an error path where they may never
    arrive), then sleeps briefly with the GIL released so the workers finish.
    """
    if ctx.enabled and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        time.sleep(0.2)
        dist.destroy_process_group()


@contextmanager
def process_group(device: torch.device, parallelism: str = "ddp") -> Iterator[tuple[DistContext, torch.device]]:
    """``init_distributed`` ... ``shutdown`` around a block; on an error the group is torn down without
    waiting at a barrier the other ranks may never reach."""
    ctx, device = init_distributed(device, parallelism)
    try:
        yield ctx, device
    except BaseException:
        shutdown(ctx, wait_for_others=False)
        raise
    shutdown(ctx)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def shard_for_rank(items: list, ctx: DistContext) -> list:
    """This rank's contiguous share of the step's items (the list length must divide evenly)."""
    if len(items) % ctx.world_size:
        raise ValueError(f"{len(items)} items cannot be split evenly over {ctx.world_size} processes")
    share = len(items) // ctx.world_size
    return items[ctx.rank * share : (ctx.rank + 1) * share]


def all_reduce_sum(value: float, ctx: DistContext) -> float:
    """Sum of a number over ranks (float64 on CPU via gloo, or on the device for nccl)."""
    if not ctx.enabled:
        return float(value)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


# How a per-rank metric combines into the global one; everything else is the mean over ranks.
_SUM_SUFFIXES = ("_tok_s", "/tokens", "/sequences")
_MAX_SUFFIXES = ("_max", "/max", "/peak_mem_mb", "/step_s", "/eval_s")
_MIN_SUFFIXES = ("_min", "/min")


def reduce_metrics(metrics: dict[str, float], ctx: DistContext, weight: float = 1.0) -> dict[str, float]:
    """Every rank's metrics combined into the global ones (see ``combine_metrics``); all ranks call it."""
    if not ctx.enabled:
        return dict(metrics)
    return combine_metrics(all_gather_objects((weight, metrics), ctx))


def combine_metrics(gathered: list[tuple[float, dict[str, float]]]) -> dict[str, float]:
    """Combine (weight, metrics) of each rank: sums for throughput and counts, max / min for extremes and
    times, a pooled std for ``*_std``, the plain mean for per-sequence ``rollout/`` statistics, and for
    everything else the mean weighted by ``weight`` (the rank's loss tokens). A key only some ranks report
    (a task tag one rank did not sample) combines over those ranks."""
    combined = {}
    for key in dict.fromkeys(k for _, m in gathered for k in m):
        pairs = [(w, m[key]) for w, m in gathered if key in m]
        per_sequence = key.startswith("rollout/")  # every rank has the same number of sequences
        weights = [w for w, _ in pairs] if sum(w for w, _ in pairs) > 0 and not per_sequence else [1.0] * len(pairs)
        values = [v for _, v in pairs]
        if key.endswith(_SUM_SUFFIXES):
            combined[key] = float(sum(values))
        elif key.endswith(_MAX_SUFFIXES):
            combined[key] = float(max(values))
        elif key.endswith(_MIN_SUFFIXES):
            combined[key] = float(min(values))
        elif key.endswith(("_std", "/std")) and all(key[: -len("std")] + "mean" in m for _, m in gathered if key in m):
            means = [m[key[: -len("std")] + "mean"] for _, m in gathered if key in m]
            pooled = sum(w * mu for w, mu in zip(weights, means)) / sum(weights)
            second = sum(w * (sd * sd + mu * mu) for w, sd, mu in zip(weights, values, means)) / sum(weights)
            combined[key] = math.sqrt(max(second - pooled * pooled, 0.0))
        else:
            combined[key] = float(sum(w * v for w, v in zip(weights, values)) / sum(weights))
    return combined


def wrap_model(model: torch.nn.Module, ctx: DistContext, device: torch.device) -> torch.nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on every decoder layer, then the root); unchanged when single.
    ``model`` is called as ``model(input_ids_B_T, attention_mask_B_T)`` (a ``HiddenForward``)."""
    if not ctx.enabled:
        return model
    if ctx.parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    from torch.distributed.fsdp import fully_shard

    for module in decoder_layers(model):
        fully_shard(module, reshard_after_forward=True)
    # FSDP2's own defaults, explicit so ``gathered`` can restore them
    root = fully_shard(model, reshard_after_forward=False)
    # FSDP initialises lazily on the root's first forward; run one now, since generation calls the
    # layers directly (under ``gathered``) before any training forward.
    with torch.no_grad():
        model(torch.zeros(1, 1, dtype=torch.long, device=device), torch.ones(1, 1, dtype=torch.bool, device=device))
    root.reshard()
    return model


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of an HF causal LM (the units FSDP shards one at a time)."""
    from opdplus.models.forward import unwrap_model

    base = unwrap_model(model)
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if get_decoder is not None else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"cannot find decoder layers in {type(base).__name__} for FSDP; use parallel.mode=ddp")
    return list(layers)


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def local_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module to call for generation and saving: DDP's inner module; FSDP and plain as they are."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded weights on CPU (a collective under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(local_module(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return cast(dict[str, torch.Tensor], state)  # a model's state dict holds only tensors


def full_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name, unsharded: loadable with any number of processes."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(
        local_module(model), optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )


def load_full_optimizer_state_dict(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        local_module(model), optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )


def total_grad_norm(params: list[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip gradients to ``max_norm`` (inf = no clipping) and return the global norm as a float
    (FSDP2 returns it as a DTensor, reduced over shards)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf"))
    full_tensor = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
    if full_tensor is not None:
        norm = full_tensor()
    return float(norm)


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """The command ``opdplus train --nproc N ...`` runs: torchrun on this Python, same arguments."""
    import sys

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "opdplus",
        *argv,
    ]


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list when single-process)."""
    if not ctx.enabled:
        return [obj]
    gathered: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


@contextmanager
def gathered(model: torch.nn.Module) -> Iterator[None]:
    """Under FSDP, unshard every parameter (all layers and the root) and keep it so until the block ends,
    so the unwrapped model can be called directly (generation, no-grad scoring) without collectives:
    ranks may then run different numbers of decode steps (rows end at different EOS) without waiting
    for each other. Costs the full model's weights on every rank while the block runs."""
    if not is_fsdp(model):
        yield
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
    for module in modules:
        module.set_reshard_after_forward(False, recurse=False)
        module.unshard()
    try:
        yield
    finally:
        for module in modules:
            module.reshard()
            module.set_reshard_after_forward(module is not model, recurse=False)
