"""Richer teacher signals: the divergence over the teacher's top-k plus a tail bucket, and the loss
that follows the horizon rule (docs/derivations.md, "Whole sequences: the horizon") for per-position
divergences. Full-distribution per-token divergences on the student's own samples are the setting of
GKD ("On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes", Agarwal et al.
2023, arXiv 2306.13649).

With a per-position divergence D_t = D_f(q(.|c_t) || pi(.|c_t)) computed over a vocabulary (exact)
or over the teacher's top-k ids plus one bucket for the remaining mass (top-k), the objective
J = E_pi[sum_t D_t] has the gradient

    grad J = E_pi[ sum_t grad D_t  +  sum_t (sum_{t' > t} gamma^(t'-t) D_t') grad log pi(y_t|c_t) ]

(gamma = 1: the exact gradient of J; gamma = 0: contexts held fixed). The local term is
differentiated directly; the future part is a policy-gradient term with advantage -sum_{t'>t} ...
The top-k divergence is the f-divergence between the two distributions coarsened to k + 1 outcomes;
it equals the exact one when the tail holds at most one token (k >= V - 1) and, by the data
processing inequality, never exceeds it otherwise.
"""

from __future__ import annotations

import math

import torch

from opdplus.ops.advantages import check_token_tensors, discounted_returns
from opdplus.ops.divergences import Divergence, get_divergence, saturate
from opdplus.ops.loss import check_normalizer, policy_loss

Tensor = torch.Tensor
TAIL_LOG_FLOOR = -80.0  # tail log-mass never goes below this (e^-80 ~ 2e-35), keeping log(0) out


def log1mexp(x: Tensor, floor: float = TAIL_LOG_FLOOR) -> Tensor:
    """log(1 - exp(x)) for x <= 0, at least ``floor``; finite value and gradient everywhere."""
    x = torch.minimum(x, torch.full_like(x, -math.exp(floor)))  # gradient stops where 1 - e^x < e^floor
    value = torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
    return value.clamp(min=floor)


def topk_tail_logprobs(logprobs_B_T_K: Tensor) -> Tensor:
    """[B, T, K + 1] log-probabilities: the top-k entries plus the log of the remaining mass."""
    logprobs = logprobs_B_T_K.double()
    tail_B_T = log1mexp(torch.logsumexp(logprobs, dim=-1))
    return torch.cat([logprobs, tail_B_T[..., None]], dim=-1)


def topk_divergence(
    student_logits_B_T_V: Tensor,
    teacher_topk_ids_B_T_K: Tensor,
    teacher_topk_logprobs_B_T_K: Tensor,
    divergence: str | Divergence,
) -> Tensor:
    """D_f(q || pi) per position over the teacher's top-k ids plus one tail bucket, [B, T].

    ``teacher_topk_logprobs_B_T_K`` are log q(v|c_t) normalised over the full vocabulary (as a
    served teacher returns them); the teacher's tail mass is 1 - sum of them, floored at e^-80. With
    K = V there is no tail bucket. Differentiable in the student logits; float64 inside, saturated
    to the finite range of the logits' dtype (at least float32) like ``exact_divergence``.
    """
    if student_logits_B_T_V.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V], got shape {tuple(student_logits_B_T_V.shape)}")
    if (
        teacher_topk_ids_B_T_K.shape != teacher_topk_logprobs_B_T_K.shape
        or teacher_topk_ids_B_T_K.shape[:2] != student_logits_B_T_V.shape[:2]
    ):
        raise ValueError(
            "teacher top-k ids and log-probs must be [B, T, K] matching the student's [B, T]: got "
            f"student_logits={tuple(student_logits_B_T_V.shape)}, ids={tuple(teacher_topk_ids_B_T_K.shape)}, "
            f"logprobs={tuple(teacher_topk_logprobs_B_T_K.shape)}"
        )
    div = get_divergence(divergence)
    compute_dtype = torch.promote_types(student_logits_B_T_V.dtype, torch.float32)
    student_logp_B_T_V = torch.log_softmax(student_logits_B_T_V.to(compute_dtype), dim=-1)
    ids_B_T_K = teacher_topk_ids_B_T_K.long()
    student_topk_B_T_K = student_logp_B_T_V.gather(-1, ids_B_T_K).double()
    teacher_topk_B_T_K = teacher_topk_logprobs_B_T_K.detach().double()
    if ids_B_T_K.shape[-1] < student_logits_B_T_V.shape[-1]:
        # The student's tail is summed directly (no 1 - sum cancellation); the teacher's comes from
        # its top-k mass, since a served teacher returns nothing else.
        in_topk_B_T_V = torch.zeros_like(student_logp_B_T_V, dtype=torch.bool).scatter(-1, ids_B_T_K, True)
        student_tail_B_T = torch.logsumexp(student_logp_B_T_V.masked_fill(in_topk_B_T_V, -math.inf), dim=-1)
        student_topk_B_T_K = torch.cat(
            [student_topk_B_T_K, student_tail_B_T.double().clamp(min=TAIL_LOG_FLOOR)[..., None]], -1
        )
        teacher_topk_B_T_K = topk_tail_logprobs(teacher_topk_B_T_K)
    return saturate(div.perspective(student_topk_B_T_K, teacher_topk_B_T_K).sum(-1), compute_dtype)


def per_position_divergence_loss(
    divergence_B_T: Tensor,
    student_logprobs: Tensor,
    sampler_logprobs: Tensor,
    loss_mask: Tensor,
    *,
    gamma: float = 0.0,
    clip_eps: float | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Loss for an exact or top-k per-position divergence D_t (with grad), horizon rule applied.

    loss = (1/N) sum_t mask * D_t  +  policy_loss with advantage A_t = -sum_{t'>t} gamma^(t'-t) D_t'
    (the future part vanishes for gamma = 0). ``student_logprobs`` are log pi(y_t|c_t) of the sampled
    tokens under the current weights, ``sampler_logprobs`` those recorded at generation.
    """
    check_token_tensors(
        loss_mask, divergence=divergence_B_T, student_logprobs=student_logprobs, sampler_logprobs=sampler_logprobs
    )
    if normalizer is None:
        normalizer = loss_mask.sum().clamp(min=1)
    else:
        check_normalizer(normalizer)
    out_dtype = torch.promote_types(divergence_B_T.dtype, torch.float32)
    divergence_64 = divergence_B_T.double()
    local = torch.where(loss_mask, divergence_64, torch.zeros_like(divergence_64)).sum() / normalizer
    if gamma == 0.0:
        return local.to(out_dtype)
    detached = divergence_64.detach()
    future_B_T = discounted_returns(detached, loss_mask, gamma) - torch.where(
        loss_mask, detached, torch.zeros_like(detached)
    )
    future_loss = policy_loss(
        student_logprobs, sampler_logprobs, -future_B_T, loss_mask, clip_eps=clip_eps, normalizer=normalizer
    )
    return (local + future_loss).to(out_dtype)
