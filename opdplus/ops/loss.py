"""The policy-gradient surrogate: PPO's clipped objective ("Proximal Policy Optimization Algorithms",
Schulman et al. 2017, arXiv 1707.06347, eq. 7) with the distillation advantages of docs/derivations.md.

    loss = -(1/N) sum_{b,t} mask * min(rho A, clip(rho, 1 - eps, 1 + eps) A),
    rho  = exp(log pi_theta - log pi_sampler)

N is the number of loss tokens in the whole optimizer step (pass it as ``normalizer`` when the step
is split into micro-batches), so micro-batching and accumulation do not change the update. On-policy
with one update per batch, rho = 1 and the gradient is -mean(A grad log pi).
"""

from __future__ import annotations

import math

import torch

from opdplus.ops.advantages import check_token_tensors

Tensor = torch.Tensor


def check_normalizer(normalizer: float | Tensor) -> None:
    """Raise ValueError unless ``normalizer`` is one finite number > 0 (a tensor costs one host sync)."""
    if torch.is_tensor(normalizer) and normalizer.numel() != 1:
        raise ValueError(f"normalizer must be a number or a one-element tensor, got shape {tuple(normalizer.shape)}")
    value = float(normalizer)
    if not 0 < value < math.inf:
        raise ValueError(f"normalizer must be a finite number > 0 (the loss tokens of the step), got {value}")


def ppo_clipped(ratio: Tensor, advantages: Tensor, clip_eps: float) -> Tensor:
    """Where PPO's clipped branch is the minimum: rho > 1 + eps with A > 0, or rho < 1 - eps with A < 0."""
    return ((ratio > 1 + clip_eps) & (advantages > 0)) | ((ratio < 1 - clip_eps) & (advantages < 0))


def surrogate(log_ratio: Tensor, advantages: Tensor, clip_eps: float | None) -> Tensor:
    """rho A, or min(rho A, clip(rho, 1 - eps, 1 + eps) A) with ``clip_eps``; advantages are constants.

    A clipped term or one with A = 0 is a constant, so its gradient is 0 even where rho overflows.
    """
    ratio = log_ratio.detach().exp()
    constant = advantages == 0
    if clip_eps is not None:
        constant = constant | ppo_clipped(ratio, advantages, clip_eps)
    value = torch.where(constant, torch.zeros_like(log_ratio), log_ratio).exp() * advantages
    if clip_eps is None:
        return value
    return torch.where(constant, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages, value)


def policy_loss(
    student_logprobs: Tensor,
    sampler_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    *,
    clip_eps: float | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Scalar importance-ratio surrogate to minimise; gradients flow through ``student_logprobs`` only.

    ``advantages`` are treated as constants (detached). ``clip_eps`` turns on PPO ratio clipping.
    ``normalizer`` defaults to the number of loss tokens in this call. Float64 inside; the loss has
    the student's dtype, at least float32.
    """
    check_token_tensors(
        loss_mask, student_logprobs=student_logprobs, sampler_logprobs=sampler_logprobs, advantages=advantages
    )
    if clip_eps is not None and not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    if normalizer is None:
        normalizer = loss_mask.sum().clamp(min=1)
    else:
        check_normalizer(normalizer)
    student = student_logprobs.double()
    log_ratio = torch.where(loss_mask, student - sampler_logprobs.detach().double(), torch.zeros_like(student))
    terms = surrogate(log_ratio, advantages.detach().double(), clip_eps)
    total = torch.where(loss_mask, terms, torch.zeros_like(terms)).sum()
    return (-total / normalizer).to(torch.promote_types(student_logprobs.dtype, torch.float32))


def ratio_clip_fraction(
    student_logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor, clip_eps: float
) -> Tensor:
    """Fraction of loss tokens where the PPO clip is active (the clipped branch is the minimum)."""
    ratio = torch.where(
        loss_mask, student_logprobs.detach() - sampler_logprobs, torch.zeros_like(sampler_logprobs)
    ).exp()
    active = ppo_clipped(ratio, advantages, clip_eps)
    return (active & loss_mask).sum().float() / loss_mask.sum().clamp(min=1).float()
