"""Top-k / exact teacher signals: top-k vs exact, and the horizon rule checked by enumeration."""

import pytest
import torch

import opdplus
from opdplus import check
from opdplus.ops.signals import log1mexp, per_position_divergence_loss, topk_divergence

DIVS = check.check_divergences()


def logits(seed, B=2, T=3, V=6):
    gen = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(B, T, V, generator=gen), 2 * torch.randn(B, T, V, generator=gen)


def teacher_topk(teacher_logits, k):
    logprobs = torch.log_softmax(teacher_logits, -1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.label)
def test_topk_equals_exact_when_tail_holds_at_most_one_token(div):
    student, teacher = logits(0)
    exact = opdplus.exact_divergence(student.double(), teacher.double(), div)
    for k in (6, 5):  # k = V and k = V - 1
        ids, values = teacher_topk(teacher.double(), k)  # the tail is 1 - sum: needs float64 top-k
        torch.testing.assert_close(topk_divergence(student.double(), ids, values, div), exact, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.label)
def test_topk_never_exceeds_exact_and_is_differentiable(div):
    student, teacher = logits(1)
    student.requires_grad_(True)
    ids, values = teacher_topk(teacher, 2)
    coarse = topk_divergence(student, ids, values, div)
    assert (coarse <= opdplus.exact_divergence(student, teacher, div) + 1e-5).all()
    coarse.sum().backward()
    assert student.grad is not None
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0


def test_topk_finite_when_teacher_is_certain():
    student, teacher = logits(2)
    teacher[..., 0] = 60.0  # all teacher mass on token 0: its tail rounds to exactly 0
    student.requires_grad_(True)
    ids, values = teacher_topk(teacher, 1)
    for div in DIVS:
        value = topk_divergence(student, ids, values, div)
        (grad,) = torch.autograd.grad(value.sum(), student)
        assert torch.isfinite(value).all() and torch.isfinite(grad).all(), div.label


def test_log1mexp_accuracy_and_floor():
    x = torch.tensor([-1e-10, -0.1, -0.7, -5.0, -50.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), torch.log(1 - torch.exp(x)).clamp(min=-80))
    zero = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    value = log1mexp(zero)
    value.backward()
    assert zero.grad is not None
    assert value.item() == -80.0 and torch.isfinite(zero.grad).all()


def test_topk_shape_errors():
    with pytest.raises(ValueError, match=r"ids=\(2, 3, 2\), logprobs=\(2, 3, 3\)"):
        topk_divergence(torch.zeros(2, 3, 6), torch.zeros(2, 3, 2, dtype=torch.long), torch.zeros(2, 3, 3), "jsd")


def exact_signal_gradient(div, gamma, student_logits, teacher_logits, problem):
    """Exact expectation over sequences of the gradient of the per-position (exact) divergence loss."""
    theta = student_logits.clone().requires_grad_(True)
    divergence_Y_D = opdplus.exact_divergence(theta[None], teacher_logits[None], div)[0][problem.context_index_Y_D]
    student_logprobs_Y_D = check.token_logprobs(theta, problem)
    weight_Y = student_logprobs_Y_D.detach().sum(-1).exp()
    mask = torch.ones(1, problem.depth, dtype=torch.bool)
    total = sum(
        (
            weight_Y[y]
            * per_position_divergence_loss(
                divergence_Y_D[y : y + 1],
                student_logprobs_Y_D[y : y + 1],
                student_logprobs_Y_D[y : y + 1].detach(),
                mask,
                gamma=gamma,
                normalizer=1.0,
            )
            for y in range(len(weight_Y))
        ),
        start=theta.new_zeros(()),
    )
    (grad,) = torch.autograd.grad(total, theta)
    return grad


def tabular(seed):
    problem = check.TabularProblem.build(3, 3)
    gen = torch.Generator().manual_seed(seed)
    n = len(problem.context_prefixes)
    return (
        problem,
        1.5 * torch.randn(n, 3, generator=gen, dtype=torch.float64),
        1.5 * torch.randn(n, 3, generator=gen, dtype=torch.float64),
    )


@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.label)
def test_per_position_loss_is_exact_gradient_by_enumeration(div, gamma):
    """E_y[grad loss(y)] with exact per-position divergences equals the exact gradient of J."""
    problem, student_logits, teacher_logits = tabular(0)
    _, reference = check.reference_gradient(student_logits, teacher_logits, problem, div, gamma)
    estimate = exact_signal_gradient(div, gamma, student_logits, teacher_logits, problem)
    assert float((estimate - reference).norm() / reference.norm()) < 1e-10


@pytest.mark.parametrize("gamma", [0.0, 1.0])
@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.label)
def test_exact_and_sampled_signals_agree_in_expectation(div, gamma):
    """The exact per-position loss and the sampled-token OPD+ estimator have the same expected gradient."""
    problem, student_logits, teacher_logits = tabular(2)
    sampled = check.estimator_gradient(student_logits, teacher_logits, problem, div, "opd_plus", gamma)
    exact = exact_signal_gradient(div, gamma, student_logits, teacher_logits, problem)
    torch.testing.assert_close(exact, sampled, rtol=1e-9, atol=1e-12)
