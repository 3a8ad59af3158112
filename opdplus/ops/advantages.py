"""Per-token advantages for sampled-token on-policy distillation: the OPD+ estimator of "OPD+: Rethinking the
Advantage Design for On-Policy Distillation" (Zhao et al. 2026, arXiv 2606.01039) and the stop-gradient OPD it
corrects; derivation in docs/derivations.md ("The gradient, one position at a time", "Whole sequences: the
horizon").

With l_t = log q(y_t|c_t) - log pi(y_t|c_t), u_t = exp(l_t) and the return-to-go
R_t = sum_{t' >= t} gamma^(t'-t) f(u_t') over the student's own tokens:

    OPD  (stop-gradient):  A_t = -R_t
    OPD+ (unbiased):       A_t = -R_t + u_t f'(u_t)

E_pi[-sum_t A_t grad log pi(y_t|c_t)] is the exact gradient of J_f = E_pi[sum_t f(u_t)] for OPD+ with
gamma = 1, and of the per-position objective with contexts held fixed for gamma = 0. Stop-gradient
OPD matches only for reverse KL, where u f'(u) = -1 is a constant baseline.
"""

from __future__ import annotations

import math
import typing

import torch

from opdplus.ops.divergences import Divergence, get_divergence

Tensor = torch.Tensor
Estimator = typing.Literal["opd", "opd_plus"]  # stop-gradient | unbiased
ESTIMATORS: tuple[str, ...] = typing.get_args(Estimator)


def check_token_tensors(loss_mask: Tensor, **tensors: Tensor) -> None:
    """Raise ValueError unless every tensor is a float [B, T] tensor shaped like ``loss_mask``."""
    if loss_mask.dim() != 2:
        raise ValueError(f"loss_mask must be [B, T], got shape {tuple(loss_mask.shape)}")
    if loss_mask.dtype != torch.bool:
        raise ValueError(f"loss_mask must be a bool tensor (True = token counts), got dtype {loss_mask.dtype}")
    for name, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {tensor.dtype}")
        if tensor.shape != loss_mask.shape:
            shapes = ", ".join(f"{k}={tuple(v.shape)}" for k, v in tensors.items())
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but loss_mask has {tuple(loss_mask.shape)}; "
                f"all per-token tensors must be [B, T] (got {shapes})"
            )


def check_logprobs_at_loss_tokens(student_logprobs: Tensor, teacher_logprobs: Tensor, loss_mask: Tensor) -> None:
    """Raise ValueError at the first loss token whose student log-prob is not finite or whose teacher
    log-prob is NaN or +inf (one host sync; masked positions may hold anything)."""
    bad_student = loss_mask & ~student_logprobs.isfinite()
    bad_teacher = loss_mask & (teacher_logprobs.isnan() | (teacher_logprobs == math.inf))
    if not bool((bad_student | bad_teacher).any()):
        return
    name, tensor, bad = ("student_logprobs", student_logprobs, bad_student)
    if not bool(bad_student.any()):
        name, tensor, bad = ("teacher_logprobs", teacher_logprobs, bad_teacher)
    b, t = (int(i) for i in bad.nonzero()[0])
    raise ValueError(
        f"{name}[{b}, {t}] = {float(tensor[b, t])} at a loss token: a sampled token has a finite log-probability "
        "under the student and a teacher log-probability in [-inf, 0]; set loss_mask False there or fix the "
        "log-probabilities"
    )


def masked_log_ratio(
    student_logprobs: Tensor, teacher_logprobs: Tensor, loss_mask: Tensor, log_ratio_clip: float | None = None
) -> Tensor:
    """l = log q - log pi at loss tokens (clipped to [-c, c] when given), 0 elsewhere; detached."""
    log_ratio = teacher_logprobs.detach() - student_logprobs.detach()
    log_ratio = torch.where(loss_mask, log_ratio, torch.zeros_like(log_ratio))
    if log_ratio_clip is not None:
        if not log_ratio_clip > 0:  # also rejects NaN
            raise ValueError(f"log_ratio_clip must be > 0, got {log_ratio_clip}")
        log_ratio = log_ratio.clamp(-log_ratio_clip, log_ratio_clip)
    return log_ratio


def log_ratio_clip_fraction(
    student_logprobs: Tensor, teacher_logprobs: Tensor, loss_mask: Tensor, clip: float | None
) -> Tensor:
    """Fraction of loss tokens whose |log q - log pi| exceeds ``clip`` (0 when clip is None)."""
    if clip is None:
        return torch.zeros((), dtype=torch.float32, device=loss_mask.device)
    if not clip > 0:  # also rejects NaN, as the advantages do
        raise ValueError(f"log_ratio_clip must be > 0, got {clip}")
    log_ratio = masked_log_ratio(student_logprobs, teacher_logprobs, loss_mask)
    clipped = (log_ratio.abs() > clip) & loss_mask
    return clipped.sum().float() / loss_mask.sum().clamp(min=1).float()


def discounted_returns(values_B_T: Tensor, loss_mask: Tensor, gamma: float) -> Tensor:
    """R_t = sum_{t' >= t, mask} gamma^(k(t') - k(t)) v_t', with k counting loss tokens.

    Time advances only on the student's own tokens, so tool-output or padding tokens in between do
    not change the discount. gamma = 0 returns v itself, gamma = 1 the reverse cumulative sum.
    Zero where ``loss_mask`` is False.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    values_B_T = torch.where(loss_mask, values_B_T, torch.zeros_like(values_B_T))
    if gamma == 0.0:
        return values_B_T
    if gamma == 1.0:
        returns_B_T = values_B_T.flip(-1).cumsum(-1).flip(-1)
    else:
        returns_B_T = torch.zeros_like(values_B_T)
        running_B = torch.zeros_like(values_B_T[:, 0])
        for t in range(values_B_T.shape[1] - 1, -1, -1):
            running_B = torch.where(loss_mask[:, t], values_B_T[:, t] + gamma * running_B, running_B)
            returns_B_T[:, t] = running_B
    return torch.where(loss_mask, returns_B_T, torch.zeros_like(returns_B_T))


def advantages(
    student_logprobs: Tensor,
    teacher_logprobs: Tensor,
    loss_mask: Tensor,
    *,
    divergence: str | Divergence,
    estimator: str,
    gamma: float = 0.0,
    log_ratio_clip: float | None = None,
) -> Tensor:
    """Detached per-token advantages [B, T] (to be maximised) for D_f(q || pi) on sampled tokens.

    ``estimator="opd"``: A_t = -sum_{t'>=t} gamma^(t'-t) f(u_t')  (stop-gradient, biased unless reverse KL)
    ``estimator="opd_plus"``: the same plus u_t f'(u_t)          (unbiased for every f)

    ``student_logprobs`` are log pi(y_t|c_t) of the policy that sampled y (the sampler), and
    ``teacher_logprobs`` log q(y_t|c_t). ``log_ratio_clip`` bounds l = log q - log pi to [-c, c]
    before anything else (bias for variance). Zero where ``loss_mask`` is False. Computed in
    float64 and saturated to the finite range of the input dtype, so finite inputs never give
    NaN or inf.
    """
    check_token_tensors(loss_mask, student_logprobs=student_logprobs, teacher_logprobs=teacher_logprobs)
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators: {', '.join(ESTIMATORS)}")
    div = get_divergence(divergence)
    check_logprobs_at_loss_tokens(student_logprobs, teacher_logprobs, loss_mask)
    out_dtype = torch.promote_types(student_logprobs.dtype, teacher_logprobs.dtype)
    with torch.no_grad():
        log_ratio = masked_log_ratio(student_logprobs, teacher_logprobs, loss_mask, log_ratio_clip)
        log_ratio = div.safe_log_ratio(log_ratio.double())
        advantages_B_T = -discounted_returns(div.f(log_ratio), loss_mask, gamma)
        if estimator == "opd_plus":
            advantages_B_T = advantages_B_T + div.u_fprime(log_ratio)
        advantages_B_T = torch.where(loss_mask, advantages_B_T, torch.zeros_like(advantages_B_T))
        finite_max = torch.finfo(out_dtype).max
        return advantages_B_T.clamp(-finite_max, finite_max).to(out_dtype)
