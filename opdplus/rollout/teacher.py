"""``LocalTeacher``: a frozen HF causal LM in this process that scores rollouts token by token."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from opdplus.models.forward import HiddenForward, completion_logprobs, softcapped
from opdplus.ops.logprobs import positions_per_chunk
from opdplus.rollout.types import RolloutBatch


class LocalTeacher:
    """Implements the ``Teacher`` protocol: ``score(batch) -> teacher_logprobs_B_T`` (0 off the loss mask).

    The model is frozen (``requires_grad=False``), kept in eval mode and run under ``no_grad``. Rows
    are scored ``batch_size`` at a time; logits are formed in blocks of about ``chunk_size`` tokens.
    ``score_topk`` gives the teacher's top-k at every position (the ``topk`` signal) and
    ``hidden_states`` the decoder output plus LM head (the ``exact`` signal, chunked by the caller).
    """

    def __init__(
        self, model: torch.nn.Module, *, batch_size: int = 16, chunk_size: int = 256, temperature: float = 1.0
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.forward = HiddenForward(self.model)
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
                self.forward,
                rows.input_ids_B_T,
                rows.attention_mask_B_T,
                batch.prompt_len,
                chunk_size=self.chunk_size,
                temperature=self.temperature,
            )
            parts.append(logprobs_B_T.where(rows.loss_mask_B_T, 0.0).to(out_device))
        return torch.cat(parts)

    @torch.no_grad()
    def hidden_states(self, batch: RolloutBatch) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
        """(hidden_B_T_H, head): ``head(hidden[:, t - 1])`` are the teacher's logits for the token at
        column t (temperature applied). The head runs on the teacher's device and returns float32."""
        self.model.eval()
        rows = batch.to(self.device)
        hidden_B_T_H = self.forward(rows.input_ids_B_T, rows.attention_mask_B_T)
        head = softcapped(self.forward.head, self.forward.softcap)
        device, temperature = self.device, self.temperature

        def logits(hidden: torch.Tensor) -> torch.Tensor:
            return (head(hidden.to(device)).float() / temperature).to(hidden.device)

        return hidden_B_T_H, logits

    @torch.no_grad()
    def score_topk(self, batch: RolloutBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's top-k at every column, ``(ids_B_T_K, logprobs_B_T_K)``, best first; column t
        holds the top-k of q(. | input_ids[:t]). Off the loss mask: ids 0..k-1 and log-probs -log k
        (a placeholder that must stay masked), as ``HTTPTeacher.score_topk`` returns."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        shape = (*batch.input_ids_B_T.shape, k)
        ids_B_T_K = torch.arange(k).expand(shape).clone()
        logprobs_B_T_K = torch.full(shape, -math.log(k))
        start = batch.prompt_len
        for first in range(0, batch.batch_size, self.batch_size):
            rows = batch.select(slice(first, first + self.batch_size))
            hidden_B_T_H, logits = self.hidden_states(rows)
            positions = positions_per_chunk(self.chunk_size, rows.batch_size)
            for col in range(start, hidden_B_T_H.shape[1], positions):
                stop = min(col + positions, hidden_B_T_H.shape[1])
                logprobs_B_C_V = torch.log_softmax(logits(hidden_B_T_H[:, col - 1 : stop - 1]), dim=-1)
                top = logprobs_B_C_V.topk(k, dim=-1)
                ids_B_T_K[first : first + rows.batch_size, col:stop] = top.indices.cpu()
                logprobs_B_T_K[first : first + rows.batch_size, col:stop] = top.values.cpu()
        keep_B_T_1 = batch.loss_mask_B_T.cpu()[..., None]
        ids_B_T_K = torch.where(keep_B_T_1, ids_B_T_K, torch.arange(k).expand(shape))
        logprobs_B_T_K = torch.where(keep_B_T_1, logprobs_B_T_K, torch.full(shape, -math.log(k)))
        device = batch.input_ids_B_T.device
        return ids_B_T_K.to(device), logprobs_B_T_K.to(device)
