"""opdplus.advantages: closed forms, horizon, masking, clipping, numerics and input errors."""

import pytest
import torch

import opdplus
from opdplus.ops.advantages import discounted_returns, log_ratio_clip_fraction
from opdplus.ops.divergences import divergence_names, get_divergence

DIVS = [get_divergence(n, **({"alpha": 0.5} if n == "alpha" else {})) for n in divergence_names()] + [
    get_divergence("alpha", alpha=-2.0),
    get_divergence("alpha", alpha=4.0),
]


def token_batch(seed=0, B=3, T=5, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    student = -torch.rand(B, T, generator=gen, dtype=dtype) * 3
    teacher = -torch.rand(B, T, generator=gen, dtype=dtype) * 3
    mask = torch.ones(B, T, dtype=torch.bool)
    return student, teacher, mask


def test_opd_plus_gamma0_matches_the_derivations_table():
    """The OPD+ advantage column of docs/derivations.md, "The table" (-f(u) + u f'(u)), for every built-in
    divergence."""
    student, teacher, mask = token_batch()
    l = teacher - student
    u = l.exp()
    a = 0.5
    table = {
        "reverse_kl": l - 1,
        "forward_kl": u,
        "jsd": 0.5 * torch.log((1 + u) / 2),
        "total_variation": 0.5 * torch.sign(u - 1),
        "hellinger": u.sqrt() - 1,
        "pearson_chi2": u**2 - 1,
        "neyman_chi2": 2 - 2 / u,
        "alpha": (u**a - 1) / a,
        "jeffreys": l + u - 1,
    }
    for name, expected in table.items():
        params = {"alpha": a} if name == "alpha" else {}
        got = opdplus.advantages(
            student, teacher, mask, divergence=get_divergence(name, **params), estimator="opd_plus"
        )
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.label)
def test_opd_is_minus_f_and_opd_plus_adds_u_fprime(div):
    student, teacher, mask = token_batch(1)
    l = teacher - student
    opd = opdplus.advantages(student, teacher, mask, divergence=div, estimator="opd")
    plus = opdplus.advantages(student, teacher, mask, divergence=div, estimator="opd_plus")
    torch.testing.assert_close(opd, -div.f(l))
    torch.testing.assert_close(plus - opd, div.u_fprime(l))


def test_gamma_one_is_reverse_cumsum_and_gamma_discounts_over_loss_tokens_only():
    student = torch.zeros(1, 5, dtype=torch.float64)
    teacher = -torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0]], dtype=torch.float64)  # reverse_kl f = -l = 1..5
    mask = torch.tensor([[True, True, False, True, True]])  # position 2 is a tool-output token
    full = opdplus.advantages(student, teacher, mask, divergence="reverse_kl", estimator="opd", gamma=1.0)
    torch.testing.assert_close(full, -torch.tensor([[1 + 2 + 4 + 5, 2 + 4 + 5, 0, 4 + 5, 5]], dtype=torch.float64))
    half = opdplus.advantages(student, teacher, mask, divergence="reverse_kl", estimator="opd", gamma=0.5)
    # the masked token does not advance time: from position 1 the next loss token is one step away
    expected = -torch.tensor(
        [[1 + 0.5 * 2 + 0.25 * 4 + 0.125 * 5, 2 + 0.5 * 4 + 0.25 * 5, 0, 4 + 0.5 * 5, 5]], dtype=torch.float64
    )
    torch.testing.assert_close(half, expected)
    plus = opdplus.advantages(student, teacher, mask, divergence="reverse_kl", estimator="opd_plus", gamma=1.0)
    torch.testing.assert_close(plus, torch.where(mask, full - 1, torch.zeros_like(full)))


def test_discounted_returns_rejects_bad_gamma():
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(torch.zeros(1, 2), torch.ones(1, 2, dtype=torch.bool), 1.5)


def test_masked_positions_are_zero_and_do_not_leak():
    student, teacher, mask = token_batch(2)
    mask[0, 1:] = False
    student[0, 1:] = -1e30  # garbage where masked must not change anything
    teacher[0, 3] = 1e30
    for div in DIVS:
        for gamma in (0.0, 0.7, 1.0):
            adv = opdplus.advantages(student, teacher, mask, divergence=div, estimator="opd_plus", gamma=gamma)
            assert torch.isfinite(adv).all()
            assert (adv[~mask] == 0).all()
            clean = opdplus.advantages(
                student[1:], teacher[1:], mask[1:], divergence=div, estimator="opd_plus", gamma=gamma
            )
            torch.testing.assert_close(adv[1:], clean)


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.label)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_never_nan_or_inf_across_log_ratios(div, dtype):
    log_ratio = torch.linspace(-50, 50, 201)
    teacher = log_ratio.reshape(1, -1).to(dtype)
    student = torch.zeros_like(teacher)
    mask = torch.ones_like(teacher, dtype=torch.bool)
    mask_none = torch.zeros_like(mask)
    for estimator in ("opd", "opd_plus"):
        for gamma in (0.0, 0.9, 1.0):
            adv = opdplus.advantages(student, teacher, mask, divergence=div, estimator=estimator, gamma=gamma)
            assert adv.dtype == dtype and torch.isfinite(adv).all(), (estimator, gamma)
            empty = opdplus.advantages(student, teacher, mask_none, divergence=div, estimator=estimator, gamma=gamma)
            assert (empty == 0).all()


def test_log_ratio_clip_bounds_l_first_and_fraction_is_reported():
    student = torch.zeros(1, 4, dtype=torch.float64)
    teacher = torch.tensor([[-10.0, -1.0, 1.0, 10.0]], dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    clipped = opdplus.advantages(
        student, teacher, mask, divergence="forward_kl", estimator="opd_plus", log_ratio_clip=2.0
    )
    torch.testing.assert_close(clipped, teacher.clamp(-2, 2).exp())  # forward_kl OPD+ advantage is u
    assert float(log_ratio_clip_fraction(student, teacher, mask, 2.0)) == 0.5
    assert float(log_ratio_clip_fraction(student, teacher, mask, None)) == 0.0
    with pytest.raises(ValueError, match="log_ratio_clip"):
        opdplus.advantages(student, teacher, mask, divergence="jsd", estimator="opd", log_ratio_clip=0.0)


def test_advantages_are_detached():
    student, teacher, mask = token_batch(3)
    student.requires_grad_(True)
    adv = opdplus.advantages(student, teacher, mask, divergence="jsd", estimator="opd_plus")
    assert not adv.requires_grad


def test_input_errors_name_what_is_wrong():
    student, teacher, mask = token_batch()
    with pytest.raises(ValueError, match=r"teacher_logprobs has shape \(3, 4\).*\(3, 5\)"):
        opdplus.advantages(student, teacher[:, :4], mask, divergence="jsd", estimator="opd")
    with pytest.raises(ValueError, match="floating-point"):
        opdplus.advantages(student.long(), teacher, mask, divergence="jsd", estimator="opd")
    with pytest.raises(ValueError, match="bool"):
        opdplus.advantages(student, teacher, mask.float(), divergence="jsd", estimator="opd")
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        opdplus.advantages(student[0], teacher[0], mask[0], divergence="jsd", estimator="opd")
    with pytest.raises(ValueError, match="valid estimators: opd, opd_plus"):
        opdplus.advantages(student, teacher, mask, divergence="jsd", estimator="ppo")
    with pytest.raises(ValueError, match="valid divergences"):
        opdplus.advantages(student, teacher, mask, divergence="klx", estimator="opd")
