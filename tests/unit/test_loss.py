"""opdplus.policy_loss: on-policy gradient, micro-batch invariance, clipping, masking, errors."""

import pytest
import torch

import opdplus


def batch(seed=0, B=4, T=6):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, 5, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 5, (B, T), generator=gen)
    teacher = -torch.rand(B, T, generator=gen, dtype=torch.float64) * 2
    mask = torch.rand(B, T, generator=gen) > 0.3
    return logits, tokens, teacher, mask


def logprobs_of(logits, tokens):
    return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]


def test_on_policy_gradient_is_mean_advantage_times_score():
    logits, tokens, teacher, mask = batch()
    logits.requires_grad_(True)
    student = logprobs_of(logits, tokens)
    adv = opdplus.advantages(student, teacher, mask, divergence="forward_kl", estimator="opd_plus")
    loss = opdplus.policy_loss(student, student.detach(), adv, mask)
    torch.testing.assert_close(loss, -(adv[mask]).mean())
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (expected,) = torch.autograd.grad(-(adv * student)[mask].sum() / mask.sum(), logits)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_micro_batches_with_global_normalizer_give_the_same_gradient(clip_eps):
    logits, tokens, teacher, mask = batch(1)
    sampler = logprobs_of(logits + 0.1 * torch.randn_like(logits), tokens).detach()  # slightly off-policy
    adv = opdplus.advantages(sampler, teacher, mask, divergence="jsd", estimator="opd_plus")

    def grad_of(row_groups):
        theta = logits.clone().requires_grad_(True)
        normalizer = mask.sum()
        for rows in row_groups:
            student = logprobs_of(theta[rows], tokens[rows])
            opdplus.policy_loss(
                student, sampler[rows], adv[rows], mask[rows], clip_eps=clip_eps, normalizer=normalizer
            ).backward()
        return theta.grad

    full = grad_of([slice(0, 4)])
    torch.testing.assert_close(grad_of([slice(0, 1), slice(1, 3), slice(3, 4)]), full, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_of([[2, 0], [3, 1]]), full, rtol=1e-12, atol=1e-14)


def test_ratio_clipping_zeroes_gradient_outside_trust_region():
    student = torch.tensor([[0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    sampler = torch.tensor([[-1.0, 1.0]], dtype=torch.float64)  # rho = e (too high), 1/e (too low)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)  # both would push further out
    mask = torch.ones(1, 2, dtype=torch.bool)
    loss = opdplus.policy_loss(student, sampler, adv, mask, clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, student)
    assert (grad == 0).all()
    unclipped = opdplus.policy_loss(student, sampler, adv, mask)
    (grad_unclipped,) = torch.autograd.grad(unclipped, student)
    assert (grad_unclipped != 0).all()


def test_masked_tokens_do_not_leak_into_value_or_gradient():
    student = torch.tensor([[-1.0, 80.0, 1e4]], dtype=torch.float32, requires_grad=True)  # exp(1e4) = inf
    sampler = torch.tensor([[-1.0, -80.0, -1e4]])
    adv = torch.tensor([[2.0, 1e30, 1e30]])
    mask = torch.tensor([[True, False, False]])
    loss = opdplus.policy_loss(student, sampler, adv, mask)
    loss.backward()
    assert loss.item() == -2.0
    assert student.grad is not None
    assert torch.isfinite(student.grad).all() and (student.grad[0, 1:] == 0).all()
    empty = opdplus.policy_loss(student.detach(), sampler, adv, torch.zeros_like(mask))
    assert empty.item() == 0.0


def test_errors():
    student = torch.zeros(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"advantages has shape \(2, 2\)"):
        opdplus.policy_loss(student, student, torch.zeros(2, 2), mask)
    with pytest.raises(ValueError, match="clip_eps"):
        opdplus.policy_loss(student, student, student, mask, clip_eps=1.5)
    with pytest.raises(ValueError, match="normalizer"):
        opdplus.policy_loss(student, student, student, mask, normalizer=0)
    with pytest.raises(ValueError, match="floating-point"):
        opdplus.policy_loss(student.long(), student, student, mask)
