"""The policy-gradient surrogate: PPO's clipped objective ("Proximal Policy Optimization Algorithms",
Schulman et al. 2017, arXiv 1707.06347, eq. 7) with the distillation advantages of docs/derivations.md.

    loss = -(1/N) sum_{b,t} mask * min(rho A, clip(rho, 1 - eps, 1 + eps) A),
    rho  = exp(log pi_theta - log pi_sampler)

N is the number of loss tokens in the whole optimizer step (pass it as ``normalizer`` when the step
is split into micro-batches), so micro-batching and accumulation do not change the update. On-policy
with one update per batch, rho = 1 and the gradient is -mean(A grad log pi).
"""

from __future__ import annotations

import torch

from opdplus.ops.advantages import check_token_tensors

Tensor = torch.Tensor


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
    ``normalizer`` defaults to the number of loss tokens in this call.
    """
    check_token_tensors(
        loss_mask, student_logprobs=student_logprobs, sampler_logprobs=sampler_logprobs, advantages=advantages
    )
    if clip_eps is not None and not 0 < clip_eps < 1:
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps}")
    log_ratio = torch.where(loss_mask, student_logprobs - sampler_logprobs.detach(), torch.zeros_like(student_logprobs))
    ratio = log_ratio.exp()
    advantages = advantages.detach()
    surrogate = ratio * advantages
    if clip_eps is not None:
        surrogate = torch.minimum(surrogate, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)
    total = torch.where(loss_mask, surrogate, torch.zeros_like(surrogate)).sum()
    if normalizer is None:
        normalizer = loss_mask.sum().clamp(min=1)
    elif not torch.is_tensor(normalizer) and normalizer <= 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    return -total / normalizer


def ratio_clip_fraction(
    student_logprobs: Tensor, sampler_logprobs: Tensor, advantages: Tensor, loss_mask: Tensor, clip_eps: float
) -> Tensor:
    """Fraction of loss tokens where the PPO clip is active (the clipped branch is the minimum)."""
    ratio = torch.where(
        loss_mask, student_logprobs.detach() - sampler_logprobs, torch.zeros_like(sampler_logprobs)
    ).exp()
    active = ((ratio > 1 + clip_eps) & (advantages > 0)) | ((ratio < 1 - clip_eps) & (advantages < 0))
    return (active & loss_mask).sum().float() / loss_mask.sum().clamp(min=1).float()
