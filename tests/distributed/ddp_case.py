"""A fixed tiny update problem shared by the 2-process workers and the single-process reference."""

from __future__ import annotations

import torch

from opdplus.models.tiny import build_tiny_model
from opdplus.rollout.types import RolloutBatch


def build_case(batch_size: int = 4, prompt_len: int = 3, completion_len: int = 6):
    """(student, optimizer_fn, batch, advantages_B_T): same values in every process."""
    torch.manual_seed(0)
    student = build_tiny_model(
        vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, seed=0
    )
    gen = torch.Generator().manual_seed(1)
    T = prompt_len + completion_len
    input_ids = torch.randint(4, 64, (batch_size, T), generator=gen)
    lengths = torch.tensor([6, 3, 5, 1])[:batch_size]
    columns = torch.arange(completion_len)
    completion_mask = columns[None, :] < lengths[:, None]
    attention = torch.cat([torch.ones(batch_size, prompt_len, dtype=torch.bool), completion_mask], dim=1)
    attention[1, 0] = False  # a left-padded prompt
    loss_mask = torch.cat([torch.zeros(batch_size, prompt_len, dtype=torch.bool), completion_mask], dim=1)
    sampler_lp = torch.where(loss_mask, -torch.rand(batch_size, T, generator=gen) * 3, 0.0)
    batch = RolloutBatch(
        input_ids_B_T=input_ids,
        attention_mask_B_T=attention,
        loss_mask_B_T=loss_mask,
        sampler_logprobs_B_T=sampler_lp,
        prompt_len=prompt_len,
        tasks=["t"] * batch_size,
    )
    advantages_B_T = torch.where(loss_mask, torch.randn(batch_size, T, generator=gen), 0.0)

    def optimizer_fn(model):
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)

    return student, optimizer_fn, batch, advantages_B_T
