"""exact_divergence gradients (gradcheck) and the enumeration check of the estimators."""

import json

import pytest
import torch

import opdplus
from opdplus import check
from opdplus.commands import main
from opdplus.ops.divergences import Divergence, get_divergence

DIVS = check.check_divergences()


@pytest.mark.parametrize("div", DIVS, ids=lambda d: d.label)
def test_exact_divergence_gradcheck(div):
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(2, 3, 4, generator=gen, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda s: opdplus.exact_divergence(s, teacher, div), (student,))


def test_exact_divergence_errors():
    with pytest.raises(ValueError, match=r"student_logits=\(2, 3, 4\), teacher_logits=\(2, 3, 5\)"):
        opdplus.exact_divergence(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), "jsd")
    with pytest.raises(ValueError, match="floating-point"):
        opdplus.exact_divergence(torch.zeros(2, 3, 4, dtype=torch.long), torch.zeros(2, 3, 4), "jsd")
    with pytest.raises(ValueError, match="valid divergences"):
        opdplus.exact_divergence(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4), "nope")


def test_exact_divergence_finite_in_float32_with_extreme_logits():
    student = torch.tensor([[[0.0, -200.0, 5.0]]])
    teacher = torch.tensor([[[0.0, 10.0, -200.0]]])
    for div in DIVS:
        value = opdplus.exact_divergence(student, teacher, div)
        assert not torch.isnan(value).any(), div.label


@pytest.fixture(scope="module")
def rows():
    return check.run_check(vocab=3, depth=3, seed=0)


@pytest.mark.parametrize("label", [d.label for d in DIVS])
def test_enumeration_opd_plus_is_exact_for_every_divergence(rows, label):
    row = next(r for r in rows if r["divergence"] == label)
    assert row["opd_plus/gamma0"] <= 1e-10 and row["opd_plus/gamma1"] <= 1e-10
    assert row["objective_error"] <= 1e-10
    if label == "reverse_kl":
        assert row["opd/gamma0"] <= 1e-10 and row["opd/gamma1"] <= 1e-10
    else:  # stop-gradient OPD is biased for every other f
        assert row["opd/gamma0"] > 1e-2 and row["opd/gamma1"] > 1e-2


def test_enumeration_detects_a_wrong_correction_term():
    """A divergence whose u f'(u) is wrong (here: halved) must fail the check, so the check can fail."""
    good = get_divergence("forward_kl")
    bad = Divergence(
        name="bad", direction="test", f=good.f, u_fprime=lambda l: 0.5 * good.u_fprime(l), weighted=good.weighted
    )
    problem = check.TabularProblem.build(3, 2)
    gen = torch.Generator().manual_seed(1)
    student = torch.randn(len(problem.context_prefixes), 3, generator=gen, dtype=torch.float64)
    teacher = torch.randn(len(problem.context_prefixes), 3, generator=gen, dtype=torch.float64)
    _, reference = check.reference_gradient(student, teacher, problem, bad, 1.0)
    estimate = check.estimator_gradient(student, teacher, problem, bad, "opd_plus", 1.0)
    assert (estimate - reference).norm() / reference.norm() > 1e-2


def test_check_cli_json_and_text(capsys):
    assert main(["check", "--json", "--vocab", "3", "--depth", "2"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["check"]
    assert payload["passed"] is True and len(payload["rows"]) == len(DIVS)
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert "unbiased for every divergence" in out and "biased: relative error" in out
    assert main(["check", "--vocab", "1"]) == 2


def test_multiturn_check_opd_plus_exact_and_stop_gradient_biased_except_reverse_kl():
    rows = check.run_multiturn_check(vocab=3, turns="ssess", seed=0)
    assert check.multiturn_passed(rows)
    for row in rows:
        for gamma in check.GAMMAS:
            assert row[f"opd_plus/gamma{gamma:g}"] <= check.OPD_PLUS_TOLERANCE
            exact_opd = row[f"opd/gamma{gamma:g}"] <= check.OPD_PLUS_TOLERANCE
            assert exact_opd == (row["divergence"] == "reverse_kl"), row


def test_multiturn_check_fails_when_the_environment_token_is_trained_as_the_students():
    problem = check.TabularProblem.build(2, 3)
    generator = torch.Generator().manual_seed(1)
    student, teacher, env = (
        torch.randn(len(problem.context_prefixes), 2, generator=generator, dtype=torch.float64) for _ in range(3)
    )
    div = get_divergence("forward_kl")
    reference = check.episode_reference_gradient(student, teacher, env, problem, "ses", div, 1.0)
    right = check.episode_estimator_gradient(student, teacher, env, problem, "ses", div, "opd_plus", 1.0)
    wrong = check.episode_estimator_gradient(student, teacher, env, problem, "sss", div, "opd_plus", 1.0)
    assert float((right - reference).norm() / reference.norm()) <= check.OPD_PLUS_TOLERANCE
    assert float((wrong - reference).norm() / reference.norm()) > 1e-3


def test_check_cli_prints_and_returns_the_multiturn_case(capsys):
    assert main(["check", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["check"]
    assert payload["multiturn"]["turns"] == "ssess" and len(payload["multiturn"]["rows"]) == len(DIVS)
    assert main(["check"]) == 0
    assert "unbiased for every divergence with the environment in the loop" in capsys.readouterr().out


def test_cross_tokenizer_case_exact_for_every_divergence_and_naive_biased():
    rows = check.run_cross_tokenizer_check(depth=3, seed=0)
    assert check.cross_tokenizer_passed(rows)
    for row in rows:
        assert row["opd_plus"] <= check.OPD_PLUS_TOLERANCE
        assert row["naive"] > check.NAIVE_MIN_ERROR
        assert (row["opd"] <= check.OPD_PLUS_TOLERANCE) == (row["divergence"] == "reverse_kl")
    assert max(row["naive"] for row in rows) > 0.05


def test_cross_tokenizer_returns_from_the_start_are_exact_too():
    """Declaring no span final (every return from the first token) keeps only more baseline: still exact."""
    import dataclasses

    problem = check.CrossTokenizerProblem.build(3)
    everything = dataclasses.replace(problem, return_from_Y_D=torch.zeros_like(problem.return_from_Y_D))
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(len(problem.student.context_prefixes), 3, generator=generator, dtype=torch.float64)
    teacher = torch.randn(len(problem.teacher_contexts), 4, generator=generator, dtype=torch.float64)
    spans = problem.teacher_span_logprobs(teacher)
    div = get_divergence("forward_kl")
    theta = student.clone().requires_grad_(True)
    (reference,) = torch.autograd.grad(check.cross_tokenizer_objective(theta, spans, problem, div), theta)
    estimate = check.cross_tokenizer_estimator_gradient(student, spans, everything, div, "opd_plus")
    assert float((estimate - reference).norm() / reference.norm()) < 1e-10


def test_check_cli_reports_the_cross_tokenizer_case(capsys):
    assert main(["check", "--json", "--vocab", "3", "--depth", "2"]) == 0
    payload = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["check"]
    assert payload["cross_tokenizer"]["passed"] is True
    assert len(payload["cross_tokenizer"]["rows"]) == len(check.check_divergences())
