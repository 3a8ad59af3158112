"""The rollout record shared by sampler, teachers and the loss.

Layout (every per-token tensor is aligned with ``input_ids_B_T``):

* ``input_ids_B_T``: prompt, left-padded to a common length, followed by the completion,
  right-padded. Column ``prompt_len`` is the first completion token of every row.
* ``attention_mask_B_T``: True = a real token (not padding).
* ``loss_mask_B_T``: True = a token the student sampled; it counts in the loss. Prompt,
  padding and (in multi-turn rollouts) tool-output tokens are False.
* ``sampler_logprobs_B_T[b, t]`` = log pi_sampler(input_ids[b, t] | input_ids[b, :t]) where
  ``loss_mask`` is True, 0 elsewhere. ``teacher_logprobs_B_T`` has the same alignment.

Position ids for a row are ``attention_mask.cumsum(-1) - 1`` (clamped at 0), so the padding side
never changes a score. The batch is self-contained: the loss needs nothing outside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol, runtime_checkable

import torch

# The tensor fields of a RolloutBatch: aligned with input_ids_B_T column by column, and all of them (per row).
_PER_TOKEN = (
    "input_ids_B_T",
    "attention_mask_B_T",
    "loss_mask_B_T",
    "sampler_logprobs_B_T",
    "teacher_logprobs_B_T",
    "teacher_topk_ids_B_T_K",
    "teacher_topk_logprobs_B_T_K",
    "span_end_B_T",
    "span_return_from_B_T",
)
_TENSORS = (*_PER_TOKEN, "truncated_B")


@dataclass
class RolloutBatch:
    input_ids_B_T: torch.Tensor
    attention_mask_B_T: torch.Tensor
    loss_mask_B_T: torch.Tensor
    sampler_logprobs_B_T: torch.Tensor
    prompt_len: int
    tasks: list[str] = field(default_factory=list)
    teacher_logprobs_B_T: torch.Tensor | None = None
    truncated_B: torch.Tensor | None = None  # True = hit max_new_tokens before EOS
    meta: list[dict] = field(default_factory=list)  # per-row extras (prompt text, task item id, ...)
    # teacher_signal=topk: the teacher's top-k at every column (see Teacher.score_topk), [B, T, K]
    teacher_topk_ids_B_T_K: torch.Tensor | None = None
    teacher_topk_logprobs_B_T_K: torch.Tensor | None = None
    # a cross-tokenizer teacher's span layout (opdplus.ops.align): the column of the last token of each
    # token's span, and the first column of the earliest span not final before the token; -1 off the completion
    span_end_B_T: torch.Tensor | None = None
    span_return_from_B_T: torch.Tensor | None = None

    def __post_init__(self) -> None:
        shape = tuple(self.input_ids_B_T.shape)
        if len(shape) != 2:
            raise ValueError(f"input_ids_B_T must be [B, T], got shape {shape}")
        for name in (
            "attention_mask_B_T",
            "loss_mask_B_T",
            "sampler_logprobs_B_T",
            "teacher_logprobs_B_T",
            "span_end_B_T",
            "span_return_from_B_T",
        ):
            value = getattr(self, name)
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape} like input_ids_B_T")
        for name in ("teacher_topk_ids_B_T_K", "teacher_topk_logprobs_B_T_K"):
            value = getattr(self, name)
            if value is not None and tuple(value.shape[:2]) != shape:
                raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape} + (K,)")
        if self.loss_mask_B_T.dtype != torch.bool or self.attention_mask_B_T.dtype != torch.bool:
            raise ValueError("loss_mask_B_T and attention_mask_B_T must be bool tensors (True = counts / real token)")

    @property
    def batch_size(self) -> int:
        return self.input_ids_B_T.shape[0]

    @property
    def position_ids_B_T(self) -> torch.Tensor:
        return (self.attention_mask_B_T.long().cumsum(-1) - 1).clamp(min=0)

    def columns(self, width: int) -> RolloutBatch:
        """The first ``width`` columns of every per-token tensor (drops trailing padding columns)."""
        cut = lambda t: None if t is None else t[:, :width]  # noqa: E731
        return replace(self, **{name: cut(getattr(self, name)) for name in _PER_TOKEN})

    def completion_lengths_B(self) -> torch.Tensor:
        """Sampled tokens per row (with a span layout, also those of spans masked out of the loss)."""
        if self.span_end_B_T is not None:
            return (self.span_end_B_T >= 0).sum(-1)
        return self.loss_mask_B_T.sum(-1)

    def to(self, device: torch.device | str) -> RolloutBatch:
        """The batch on ``device``; from CPU to CUDA through pinned memory, without blocking the host."""
        move = lambda t: None if t is None else to_device(t, torch.device(device))  # noqa: E731
        return replace(self, **{name: move(getattr(self, name)) for name in _TENSORS})

    def select(self, rows: slice | torch.Tensor | list[int]) -> RolloutBatch:
        """A sub-batch of rows (for micro-batching); keeps the column layout."""
        idx = rows if isinstance(rows, slice) else torch.as_tensor(rows, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        listed = list(range(self.batch_size))[idx] if isinstance(idx, slice) else idx.tolist()
        return replace(
            self,
            **{name: pick(getattr(self, name)) for name in _TENSORS},
            tasks=[self.tasks[i] for i in listed] if self.tasks else [],
            meta=[self.meta[i] for i in listed] if self.meta else [],
        )


@runtime_checkable
class Teacher(Protocol):
    """A frozen teacher: log q(y_t | c_t) for every token of a rollout batch.

    ``score`` returns ``teacher_logprobs_B_T`` aligned with ``batch.input_ids_B_T`` (see module
    docstring); values where ``loss_mask_B_T`` is False are 0 and must be ignored.
    """

    def score(self, batch: RolloutBatch) -> torch.Tensor: ...


@runtime_checkable
class TopKTeacher(Teacher, Protocol):
    """A teacher that also gives its top-k at every column (the ``topk`` teacher signal):
    ``score_topk(batch, k) -> (ids_B_T_K, logprobs_B_T_K)``, best first (``LocalTeacher``, ``HTTPTeacher``)."""

    def score_topk(self, batch: RolloutBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``. A CPU tensor bound for CUDA is first copied to page-locked (pinned) memory, so the
    copy to the GPU is asynchronous (``non_blocking``) and overlaps with queued kernels; otherwise ``.to``."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
