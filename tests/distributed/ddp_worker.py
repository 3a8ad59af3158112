"""Run under torchrun by tests/distributed/test_distributed.py: one update of a tiny student on this
rank's share of a fixed global batch, then rank 0 saves the full updated weights."""

from __future__ import annotations

import sys

import torch
from ddp_case import build_case

from opdplus.models.forward import HiddenForward
from opdplus.train import distributed as dist_utils
from opdplus.train.update import update_policy


def main(parallelism: str, out_path: str, micro_batch_size: int) -> None:
    ctx, device = dist_utils.init_distributed(torch.device("cpu"), parallelism)
    student, optimizer_fn, batch, advantages_B_T = build_case()
    policy = dist_utils.wrap_model(HiddenForward(student), ctx, device)
    optimizer, scheduler = optimizer_fn(policy)
    share = batch.batch_size // ctx.world_size
    rows = slice(ctx.rank * share, (ctx.rank + 1) * share)
    metrics = update_policy(
        policy,
        optimizer,
        scheduler,
        batch.select(rows),
        advantages_B_T[rows],
        micro_batch_size=micro_batch_size,
        max_grad_norm=1.0,
        ctx=ctx,
    )
    weights = dist_utils.full_model_state_dict(policy)
    if ctx.is_main:
        torch.save({"weights": weights, "metrics": metrics}, out_path)
    dist_utils.shutdown(ctx)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
