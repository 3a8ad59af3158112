"""Numerics of the math core at the edges: -inf and NaN inputs, overflow, saturation.

The expected values, for every divergence, estimator and loss:

| input                                        | value                                  | gradient           |
|----------------------------------------------|----------------------------------------|--------------------|
| vocabulary entry -inf in both logits         | contributes 0                          | contributes 0      |
| -inf student logit, teacher has mass         | the limit p -> 0: +inf for forward     | the limit (forward |
|                                              | KL, Jeffreys, Pearson chi2, alpha > 1  | KL: softmax - q),  |
|                                              |                                        | finite where it is |
| NaN logit                                    | NaN at that position, never a number   |                    |
| logits x50 (float64 finite, ~1e74)           | finite (float32: saturated at its max) | finite             |
| advantages: non-finite student log-prob or   | ValueError naming tensor and position  |                    |
| NaN teacher log-prob at a loss token         |                                        |                    |
| advantages: anything at a masked position    | 0                                      |                    |
| advantages: -inf teacher log-prob            | finite (saturated)                     |                    |
| log_ratio_clip NaN; normalizer <= 0 or NaN   | ValueError (Python number or tensor)   |                    |
| float16 advantages 6e4                       | loss -6e4 (accumulated in float64)     | finite             |
| PPO-clipped term whose ratio overflows       | the clipped value                      | 0                  |
| custom divergence, log-ratio >= 400          | saturates like the built-in            |                    |
"""

import math

import numpy as np
import pytest
import torch
from test_divergences import ALL, IDS, reference

import opdplus
from opdplus.ops.divergences import get_divergence, register_divergence, unregister_divergence
from opdplus.ops.signals import per_position_divergence_loss, topk_divergence

INF = math.inf
INFINITE_WHEN_STUDENT_IS_ZERO = {"forward_kl", "jeffreys", "pearson_chi2", "alpha(3)"}
INFINITE_GRADIENT_WHEN_STUDENT_IS_ZERO = {"pearson_chi2", "alpha(3)"}  # grows like a power of 1/p


def logits_pair(seed, dtype=torch.float64, B=2, T=3, V=8):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, V, generator=gen, dtype=dtype), torch.randn(B, T, V, generator=gen, dtype=dtype)


def value_and_grad(student_logits, teacher_logits, div):
    student = student_logits.clone().requires_grad_(True)
    value = opdplus.exact_divergence(student, teacher_logits, div)
    (grad,) = torch.autograd.grad(value.sum(), student)
    return value.detach(), grad


# --- exact_divergence -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_entry_masked_in_both_logits_contributes_nothing(name, params, dtype):
    div = get_divergence(name, **params)
    student, teacher = logits_pair(0, dtype)
    student[..., 0], teacher[..., 0] = -INF, -INF
    value, grad = value_and_grad(student, teacher, div)
    value_without, grad_without = value_and_grad(student[..., 1:], teacher[..., 1:], div)
    torch.testing.assert_close(value, value_without)
    assert (grad[..., 0] == 0).all()
    torch.testing.assert_close(grad[..., 1:], grad_without)


@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_student_minus_inf_where_teacher_has_mass(name, params):
    div = get_divergence(name, **params)
    student, teacher = logits_pair(1)
    student[..., 0] = -INF
    value, grad = value_and_grad(student, teacher, div)
    p, q = torch.softmax(student, -1).numpy(), torch.softmax(teacher, -1).numpy()
    with np.errstate(divide="ignore"):
        expected = reference(name, params, p, q)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-9, atol=1e-12)
    if div.label in INFINITE_WHEN_STUDENT_IS_ZERO:
        assert (value == INF).all()
    else:
        assert torch.isfinite(value).all()
    if div.label in INFINITE_GRADIENT_WHEN_STUDENT_IS_ZERO:
        return
    # the limit: the gradient with a logit so low that its probability underflows to exactly 0
    _, grad_limit = value_and_grad(student.masked_fill(student == -INF, -1e4), teacher, div)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, grad_limit, rtol=1e-9, atol=1e-12)


def test_forward_kl_gradient_with_minus_inf_student_is_softmax_minus_teacher():
    student, teacher = logits_pair(2)
    student[..., 0] = -INF
    value, grad = value_and_grad(student, teacher, "forward_kl")
    assert (value == INF).all()
    torch.testing.assert_close(grad, torch.softmax(student, -1) - torch.softmax(teacher, -1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("side", ["student", "teacher"])
@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_nan_logit_gives_nan_at_that_position_only(name, params, side):
    div = get_divergence(name, **params)
    student, teacher = logits_pair(3, torch.float32)
    (student if side == "student" else teacher)[0, 1, 2] = math.nan
    value = opdplus.exact_divergence(student, teacher, div)
    assert value[0, 1].isnan()
    others = torch.ones_like(value, dtype=torch.bool)
    others[0, 1] = False
    assert torch.isfinite(value[others]).all()


@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_logits_times_50_finite_where_float64_is(name, params):
    div = get_divergence(name, **params)
    student, teacher = (50 * x for x in logits_pair(4, torch.float32))
    value64, grad64 = value_and_grad(student.double(), teacher.double(), div)
    assert torch.isfinite(value64).all() and torch.isfinite(grad64).all()
    value, grad = value_and_grad(student, teacher, div)
    assert value.dtype == torch.float32
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    expected = value64.clamp(max=torch.finfo(torch.float32).max).float()
    torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_topk_entry_masked_in_both_contributes_nothing(name, params):
    div = get_divergence(name, **params)
    student, teacher = logits_pair(7)
    student[..., 0], teacher[..., 0] = -INF, -INF
    teacher_logprobs = torch.log_softmax(teacher, -1)
    ids = torch.arange(8).expand(2, 3, 8)

    student = student.requires_grad_(True)
    value = topk_divergence(student, ids[..., :4], teacher_logprobs[..., :4], div)
    (grad,) = torch.autograd.grad(value.sum(), student)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert (grad[..., 0] == 0).all()
    nan_teacher = teacher_logprobs.clone()
    nan_teacher[0, 1, 2] = math.nan
    assert topk_divergence(student.detach(), ids[..., :4], nan_teacher[..., :4], div)[0, 1].isnan()


# --- advantages -----------------------------------------------------------------------------------

ESTIMATORS = ("opd", "opd_plus")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("name,params", ALL, ids=IDS)
@pytest.mark.parametrize("bad", [-INF, INF, math.nan])
def test_advantages_reject_non_finite_student_logprob_at_loss_token(name, params, estimator, bad):
    div = get_divergence(name, **params)
    student = torch.tensor([[-1.0, bad]], dtype=torch.float64)
    teacher = torch.tensor([[-2.0, bad]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"student_logprobs\[0, 1\]"):
        opdplus.advantages(student, teacher, torch.ones(1, 2, dtype=torch.bool), divergence=div, estimator=estimator)


def test_advantages_reject_nan_teacher_logprob_at_loss_token():
    student = torch.tensor([[-1.0, -1.0]])
    teacher = torch.tensor([[-2.0, math.nan]])
    with pytest.raises(ValueError, match=r"teacher_logprobs\[0, 1\]"):
        opdplus.advantages(student, teacher, torch.ones(1, 2, dtype=torch.bool), divergence="jsd", estimator="opd")


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_advantages_ignore_anything_at_masked_positions(name, params, estimator):
    div = get_divergence(name, **params)
    student = torch.tensor([[-INF, math.nan, INF, -1.0]], dtype=torch.float64)
    teacher = torch.tensor([[-INF, -1.0, math.nan, -2.0]], dtype=torch.float64)
    mask = torch.tensor([[False, False, False, True]])
    adv = opdplus.advantages(student, teacher, mask, divergence=div, estimator=estimator, gamma=1.0)
    assert (adv[0, :3] == 0).all() and torch.isfinite(adv).all()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_advantages_finite_when_teacher_gives_zero_probability(name, params, estimator, gamma):
    div = get_divergence(name, **params)
    student = torch.tensor([[-1.0, -0.5, -3.0]])
    teacher = torch.tensor([[-INF, -1.0, -INF]])
    adv = opdplus.advantages(
        student, teacher, torch.ones(1, 3, dtype=torch.bool), divergence=div, estimator=estimator, gamma=gamma
    )
    assert torch.isfinite(adv).all()


@pytest.mark.parametrize("clip", [math.nan, 0.0, -1.0])
def test_log_ratio_clip_must_be_a_positive_number(clip):
    student = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="log_ratio_clip"):
        opdplus.advantages(
            student, student, torch.ones(1, 2, dtype=torch.bool), divergence="jsd", estimator="opd", log_ratio_clip=clip
        )


# --- policy_loss and the per-position loss --------------------------------------------------------


@pytest.mark.parametrize("normalizer", [torch.tensor(0.0), torch.tensor(math.nan), torch.tensor(-5.0), -5.0, math.nan])
def test_normalizer_must_be_positive(normalizer):
    student = torch.zeros(1, 2)
    mask = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="normalizer"):
        opdplus.policy_loss(student, student, torch.ones(1, 2), mask, normalizer=normalizer)
    with pytest.raises(ValueError, match="normalizer"):
        per_position_divergence_loss(torch.ones(1, 2), student, student, mask, normalizer=normalizer)


def test_float16_advantages_near_the_float16_max_do_not_overflow():
    student = torch.zeros(1, 4, dtype=torch.float16, requires_grad=True)
    adv = torch.full((1, 4), 6e4, dtype=torch.float16)
    loss = opdplus.policy_loss(student, student.detach(), adv, torch.ones(1, 4, dtype=torch.bool))
    assert loss.item() == pytest.approx(-6e4, rel=1e-3)
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("sampler_logprob", [-1000.0, -INF])
def test_clipped_term_with_overflowing_ratio_has_zero_gradient(sampler_logprob):
    student = torch.tensor([[0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    sampler = torch.tensor([[sampler_logprob, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    loss = opdplus.policy_loss(student, sampler, adv, torch.ones(1, 2, dtype=torch.bool), clip_eps=0.2)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(-(1.2 * 1.0 + 2.0) / 2)
    assert grad[0, 0] == 0 and grad[0, 1] == pytest.approx(-1.0)


def test_clipping_matches_the_ppo_minimum():
    gen = torch.Generator().manual_seed(6)
    student = torch.randn(3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    sampler = student.detach() + 0.5 * torch.randn(3, 7, generator=gen, dtype=torch.float64)
    adv = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(3, 7, generator=gen) > 0.2
    loss = opdplus.policy_loss(student, sampler, adv, mask, clip_eps=0.2)
    ratio = (student - sampler).exp()
    expected = -torch.minimum(ratio * adv, ratio.clamp(0.8, 1.2) * adv)[mask].sum() / mask.sum()
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-14)
    (grad,) = torch.autograd.grad(loss, student)
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_zero_advantage_term_with_overflowing_ratio_is_zero(clip_eps):
    student = torch.tensor([[0.0, -1.0]], dtype=torch.float64, requires_grad=True)
    sampler = torch.tensor([[-INF, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    loss = opdplus.policy_loss(student, sampler, adv, torch.ones(1, 2, dtype=torch.bool), clip_eps=clip_eps)
    (grad,) = torch.autograd.grad(loss, student)
    assert loss.item() == pytest.approx(-1.0)
    assert grad[0, 0] == 0 and grad[0, 1] == pytest.approx(-1.0)


# --- custom divergences ---------------------------------------------------------------------------


@pytest.fixture
def my_chi2():
    register_divergence("my_chi2", lambda u: (u - 1) ** 2)  # the README's example
    yield get_divergence("my_chi2")
    unregister_divergence("my_chi2")


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_custom_divergence_saturates_like_the_builtin(my_chi2, estimator):
    student = torch.tensor([[0.0, -50.0, -400.0, -500.0, -1000.0]], dtype=torch.float64)
    teacher = torch.zeros_like(student)
    mask = torch.ones_like(student, dtype=torch.bool)
    custom = opdplus.advantages(student, teacher, mask, divergence=my_chi2, estimator=estimator)
    builtin = opdplus.advantages(student, teacher, mask, divergence="pearson_chi2", estimator=estimator)
    assert torch.isfinite(custom).all()
    torch.testing.assert_close(custom, builtin, rtol=1e-9, atol=0)
    assert my_chi2.growth == get_divergence("pearson_chi2").growth


def test_custom_divergence_exact_saturates_where_the_student_is_zero(my_chi2):
    student, teacher = logits_pair(5)
    student[..., 0] = -INF
    value, grad = value_and_grad(student, teacher, my_chi2)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert (value > 1e100).all()  # q e^300, saturated (the built-in pearson_chi2 gives +inf), never 0


def test_custom_divergence_exact_finite_with_extreme_logits(my_chi2):
    student, teacher = (50 * x for x in logits_pair(5))
    student[..., 0] = -INF
    student[..., 1], teacher[..., 1] = -INF, -INF
    value, grad = value_and_grad(student, teacher, my_chi2)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()


def test_custom_divergence_growing_too_fast_asks_for_growth():
    with pytest.raises(ValueError, match="growth"):
        register_divergence("too_fast", lambda u: torch.exp(u) - math.e)
    assert "too_fast" not in opdplus.divergence_names()


@pytest.mark.parametrize("clip", [math.nan, 0.0, -1.0])
def test_log_ratio_clip_fraction_rejects_a_clip_that_is_not_positive(clip):
    from opdplus.ops.advantages import log_ratio_clip_fraction

    logp = torch.tensor([[-1.0, -2.0]])
    with pytest.raises(ValueError, match="log_ratio_clip must be > 0"):
        log_ratio_clip_fraction(logp, logp, torch.tensor([[True, True]]), clip)
