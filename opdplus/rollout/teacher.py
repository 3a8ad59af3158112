"""``LocalTeacher``: a frozen HF causal LM in this process that scores rollouts token by token."""
from __future__ import annotations

import torch

from opdplus.models.forward import completion_logprobs
from opdplus.rollout.types import RolloutBatch


class LocalTeacher:
    """Implements the ``Teacher`` protocol: ``score(batch) -> teacher_logprobs_B_T`` (0 off the loss mask).

    The model is frozen (``requires_grad=False``), kept in eval mode and run under ``no_grad``. Rows
    are scored ``batch_size`` at a time; logits are formed in chunks of ``chunk_size`` positions.
    """

    def __init__(self, model: torch.nn.Module, *, batch_size: int = 16, chunk_size: int = 256, temperature: float = 1.0) -> None:
        self.model = model.eval().requires_grad_(False)
        self.batch_size = batch_size
        self.chunk_size = chunk_size
        self.temperature = temperature

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> torch.Tensor:
        self.model.eval()
        out_device = batch.input_ids_B_T.device
        parts = []
        for start in range(0, batch.batch_size, self.batch_size):
            rows = batch.select(slice(start, start + self.batch_size)).to(self.device)
            logprobs_B_T = completion_logprobs(
                self.model, rows.input_ids_B_T, rows.attention_mask_B_T, batch.prompt_len,
                chunk_size=self.chunk_size, temperature=self.temperature,
            )
            parts.append(logprobs_B_T.where(rows.loss_mask_B_T, 0.0).to(out_device))
        return torch.cat(parts)
