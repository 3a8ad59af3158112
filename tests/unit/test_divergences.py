"""Divergence values against independent references, properties, and u f'(u) against autograd."""

import math

import numpy as np
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import kl_div, rel_entr

import opdplus
from opdplus.ops.divergences import (
    divergence_from_f,
    divergence_names,
    get_divergence,
    register_divergence,
    unregister_divergence,
)

ALL = [
    ("reverse_kl", {}),
    ("forward_kl", {}),
    ("jsd", {}),
    ("total_variation", {}),
    ("hellinger", {}),
    ("pearson_chi2", {}),
    ("neyman_chi2", {}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": -1.5}),
    ("alpha", {"alpha": 3.0}),
    ("jeffreys", {}),
]
IDS = [name + ("" if not p else f"({p['alpha']})") for name, p in ALL]


def random_distributions(seed, n=6, vocab=7):
    """Pairs (pi, q) of float64 distributions with some probabilities near zero (~1e-13)."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2.0 * torch.randn(2, n, vocab, generator=gen, dtype=torch.float64)
    logits[0, :, 0] -= 30.0  # student almost never picks token 0
    logits[1, :, 1] -= 30.0  # teacher almost never picks token 1
    return logits[0], logits[1]


def reference(name, params, p, q):
    """D_f(q || pi) per row from scipy / direct sums; p = pi (student), q (teacher); numpy arrays."""
    if name == "reverse_kl":
        return rel_entr(p, q).sum(-1)
    if name == "forward_kl":
        return kl_div(q, p).sum(-1)  # kl_div(x, y) = x log(x/y) - x + y, sums to KL(x||y)
    if name == "jsd":
        # scipy's distance.pyi lacks the axis argument that jensenshannon takes
        return jensenshannon(p, q, axis=-1) ** 2  # pyright: ignore[reportCallIssue]
    if name == "total_variation":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "hellinger":
        return ((np.sqrt(p) - np.sqrt(q)) ** 2).sum(-1)
    if name == "pearson_chi2":
        return ((q - p) ** 2 / p).sum(-1)
    if name == "neyman_chi2":
        return ((p - q) ** 2 / q).sum(-1)
    if name == "alpha":
        a = params["alpha"]
        return ((p ** (1 - a) * q**a).sum(-1) - 1.0) / (a * (a - 1))
    if name == "jeffreys":
        return rel_entr(p, q).sum(-1) + rel_entr(q, p).sum(-1)
    raise AssertionError(name)


@pytest.mark.parametrize("name,params", ALL, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_divergence_matches_reference(name, params, seed):
    student_logits, teacher_logits = random_distributions(seed)
    p = torch.softmax(student_logits, -1).numpy()
    q = torch.softmax(teacher_logits, -1).numpy()
    ours = opdplus.exact_divergence(student_logits[None], teacher_logits[None], get_divergence(name, **params))[0]
    np.testing.assert_allclose(ours.numpy(), reference(name, params, p, q), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_sampled_f_expectation_equals_exact(name, params):
    """E_{v~pi}[f(q(v)/pi(v))] from f(l) equals the perspective form used by exact_divergence."""
    div = get_divergence(name, **params)
    student_logits, teacher_logits = random_distributions(3)
    logp, logq = torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1)
    sampled = (logp.exp() * div.f(logq - logp)).sum(-1)
    exact = opdplus.exact_divergence(student_logits[None], teacher_logits[None], div)[0]
    torch.testing.assert_close(sampled, exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_nonnegative_and_zero_at_equality(name, params):
    div = get_divergence(name, **params)
    student_logits, teacher_logits = random_distributions(4)
    assert (opdplus.exact_divergence(student_logits[None], teacher_logits[None], div) > 0).all()
    same = opdplus.exact_divergence(student_logits[None], student_logits[None], div)
    torch.testing.assert_close(same, torch.zeros_like(same), atol=1e-12, rtol=0)
    assert div.f(torch.zeros(3, dtype=torch.float64)).abs().max() == 0  # f(1) = 0


@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_u_fprime_is_derivative_of_f_in_log_space(name, params):
    """u f'(u) = d f(exp(l)) / dl, checked against autograd away from kinks."""
    div = get_divergence(name, **params)
    log_ratio = torch.linspace(-6, 6, 61, dtype=torch.float64)
    log_ratio = log_ratio[log_ratio.abs() > 1e-6].requires_grad_(True)  # TV has a kink at l = 0
    (grad,) = torch.autograd.grad(div.f(log_ratio).sum(), log_ratio)
    torch.testing.assert_close(div.u_fprime(log_ratio.detach()), grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,params", ALL, ids=IDS)
def test_f_and_u_fprime_finite_for_extreme_log_ratios(name, params):
    div = get_divergence(name, **params)
    log_ratio = div.safe_log_ratio(torch.linspace(-50, 50, 1001, dtype=torch.float64))
    assert torch.isfinite(div.f(log_ratio)).all()
    assert torch.isfinite(div.u_fprime(log_ratio)).all()


def test_f_matches_design_table_closed_forms():
    l = torch.linspace(-3, 3, 13, dtype=torch.float64)
    u = l.exp()
    expected = {
        "reverse_kl": -l,
        "forward_kl": u * l,
        "jsd": 0.5 * (u * l - (1 + u) * torch.log((1 + u) / 2)),
        "total_variation": 0.5 * (u - 1).abs(),
        "hellinger": (u.sqrt() - 1) ** 2,
        "pearson_chi2": (u - 1) ** 2,
        "neyman_chi2": (1 - u) ** 2 / u,
        "jeffreys": (u - 1) * l,
    }
    for name, value in expected.items():
        torch.testing.assert_close(get_divergence(name).f(l), value, rtol=1e-12, atol=1e-12)
    a = 0.3
    torch.testing.assert_close(get_divergence("alpha", alpha=a).f(l), (u**a - a * u - (1 - a)) / (a * (a - 1)))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="valid divergences: reverse_kl, forward_kl, jsd"):
        get_divergence("kl")


@pytest.mark.parametrize("a,hint", [(0, "reverse_kl"), (1, "forward_kl"), (0.0, "reverse_kl"), (1.0, "forward_kl")])
def test_alpha_rejects_limits_with_pointer(a, hint):
    with pytest.raises(ValueError, match=hint):
        get_divergence("alpha", alpha=a)


def test_alpha_requires_parameter_and_rejects_nan():
    with pytest.raises(ValueError, match="alpha=0.5"):
        get_divergence("alpha")
    with pytest.raises(ValueError, match="finite"):
        get_divergence("alpha", alpha=math.nan)
    with pytest.raises(ValueError, match="does not take parameters"):
        get_divergence("jsd", alpha=0.5)


def test_custom_divergence_from_f_alone():
    """A divergence registered from f(u) only gets u f'(u) by autograd and an exact perspective form."""
    register_divergence("my_chi2", lambda u: (u - 1) ** 2)
    try:
        assert "my_chi2" in divergence_names()
        custom, builtin = get_divergence("my_chi2"), get_divergence("pearson_chi2")
        l = torch.linspace(-5, 5, 21, dtype=torch.float64)
        torch.testing.assert_close(custom.f(l), builtin.f(l))
        torch.testing.assert_close(custom.u_fprime(l), builtin.u_fprime(l))
        student_logits, teacher_logits = random_distributions(5)
        torch.testing.assert_close(
            opdplus.exact_divergence(student_logits[None], teacher_logits[None], "my_chi2"),
            opdplus.exact_divergence(student_logits[None], teacher_logits[None], "pearson_chi2"),
            rtol=1e-9,
            atol=0,
        )
        with pytest.raises(ValueError, match="already registered"):
            register_divergence("my_chi2", lambda u: (u - 1) ** 2)
    finally:
        unregister_divergence("my_chi2")
    assert "my_chi2" not in divergence_names()


def test_divergence_from_f_object_passes_through():
    div = divergence_from_f("sq_log", lambda u: torch.log(u) ** 2)
    assert get_divergence(div) is div
    l = torch.tensor([0.5, -2.0], dtype=torch.float64)
    torch.testing.assert_close(div.u_fprime(l), 2 * l)
