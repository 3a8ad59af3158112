"""Exact per-position divergence over the full vocabulary from logits (the ``exact`` teacher signal).

    D_f(q || pi)(c_t) = sum_v pi(v|c_t) f(q(v|c_t) / pi(v|c_t))

computed in the perspective form pi f(q/pi) from log-softmaxes, so it stays finite where pi -> 0.
Differentiable with respect to the student logits (the teacher side is treated as a constant).
Float64 inside; the result is saturated to the finite range of the logits' dtype (at least float32),
so it is finite wherever the float64 value is.
"""

from __future__ import annotations

import torch

from opdplus.ops.divergences import Divergence, get_divergence, saturate

Tensor = torch.Tensor


def exact_divergence(student_logits: Tensor, teacher_logits: Tensor, divergence: str | Divergence) -> Tensor:
    """D_f(q || pi) at each position, [B, T], from student and teacher logits [B, T, V]."""
    if student_logits.dim() != 3 or student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must both be [B, T, V] with the same shape, got "
            f"student_logits={tuple(student_logits.shape)}, teacher_logits={tuple(teacher_logits.shape)}"
        )
    for name, logits in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not logits.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {logits.dtype}")
    div = get_divergence(divergence)
    out_dtype = torch.promote_types(student_logits.dtype, torch.float32)
    student_logp_B_T_V = torch.log_softmax(student_logits.double(), dim=-1)
    teacher_logp_B_T_V = torch.log_softmax(teacher_logits.detach().double(), dim=-1)
    return saturate(div.perspective(student_logp_B_T_V, teacher_logp_B_T_V).sum(-1), out_dtype)
