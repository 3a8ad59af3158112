"""Per-position divergences from hidden states, one chunk of positions at a time.

The exact and top-k teacher signals need the student's full distribution at every position. Formed
naively that is a [B, T, V] float tensor for the student, another for the teacher, and the autograd
graph keeps several more. Here the LM heads run on one chunk of positions at a time and, when the
student needs a gradient, each chunk is recomputed in the backward pass (activation checkpointing),
so peak memory grows with chunk * V (chunk = tokens per block), not B * T * V.
``exact_divergence`` / ``topk_divergence``
on full logits are the slow twins the tests compare against.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from opdplus.ops.divergences import Divergence, get_divergence
from opdplus.ops.exact import exact_divergence
from opdplus.ops.logprobs import map_position_chunks
from opdplus.ops.signals import topk_divergence

Tensor = torch.Tensor
Head = Callable[[Tensor], Tensor]


def _at_least_float32(logits: Tensor) -> Tensor:
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _check_hidden(student_hidden_B_T_H: Tensor, chunk_size: int) -> None:
    if student_hidden_B_T_H.dim() != 3:
        raise ValueError(f"student_hidden must be [B, T, H], got shape {tuple(student_hidden_B_T_H.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def chunked_exact_divergence(
    student_hidden_B_T_H: Tensor,
    student_head: Head,
    teacher_hidden_B_T_H: Tensor,
    teacher_head: Head,
    divergence: str | Divergence,
    *,
    chunk_size: int = 256,
) -> Tensor:
    """D_f(q || pi) over the full vocabulary at each position, [B, T], from hidden states and heads.

    Same value and student gradient as ``exact_divergence(student_head(h_s), teacher_head(h_t))``;
    the teacher side is constant (no gradient).
    """
    _check_hidden(student_hidden_B_T_H, chunk_size)
    if teacher_hidden_B_T_H.shape[:2] != student_hidden_B_T_H.shape[:2]:
        raise ValueError(
            f"teacher_hidden {tuple(teacher_hidden_B_T_H.shape)} and student_hidden "
            f"{tuple(student_hidden_B_T_H.shape)} must share [B, T]"
        )
    div = get_divergence(divergence)

    def chunk(student_hidden_B_C_H: Tensor, teacher_hidden_B_C_H: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_logits_B_C_V = _at_least_float32(teacher_head(teacher_hidden_B_C_H))
        return exact_divergence(_at_least_float32(student_head(student_hidden_B_C_H)), teacher_logits_B_C_V, div)

    return map_position_chunks(chunk, (student_hidden_B_T_H, teacher_hidden_B_T_H.detach()), chunk_size)


def chunked_topk_divergence(
    student_hidden_B_T_H: Tensor,
    student_head: Head,
    teacher_topk_ids_B_T_K: Tensor,
    teacher_topk_logprobs_B_T_K: Tensor,
    divergence: str | Divergence,
    *,
    chunk_size: int = 256,
) -> Tensor:
    """D_f(q || pi) over the teacher's top-k plus a tail bucket, [B, T], chunked like the above."""
    _check_hidden(student_hidden_B_T_H, chunk_size)
    div = get_divergence(divergence)

    def chunk(student_hidden_B_C_H: Tensor, ids_B_C_K: Tensor, logprobs_B_C_K: Tensor) -> Tensor:
        return topk_divergence(_at_least_float32(student_head(student_hidden_B_C_H)), ids_B_C_K, logprobs_B_C_K, div)

    return map_position_chunks(
        chunk,
        (student_hidden_B_T_H, teacher_topk_ids_B_T_K, teacher_topk_logprobs_B_T_K.detach()),
        chunk_size,
    )
