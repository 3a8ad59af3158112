"""Hand-computed values: a 2x3 batch through ``advantages`` and ``policy_loss``, expected outputs written out.

The inputs are logs of simple probabilities so every expected value is a short expression in ln 2
(docs/derivations.md, "The table" and "Whole sequences: the horizon"; the loss is PPO's clipped
surrogate, Schulman et al. 2017, arXiv 1707.06347, eq. 7).
"""

from __future__ import annotations

import math

import pytest
import torch

from opdplus.ops.advantages import advantages
from opdplus.ops.loss import policy_loss

LN2 = math.log(2.0)
F64 = torch.float64

# pi (student) and q (teacher) at the sampled tokens; row 1, position 1 is masked (a tool-output token).
#   u = q / pi: row 0 (0.5, 1, 2), row 1 (2, 0.25, 2);  l = log u: row 0 (-ln2, 0, ln2), row 1 (ln2, -2 ln2, ln2)
STUDENT_LOGPROBS_B_T = torch.tensor([[0.5, 0.25, 0.5], [0.25, 0.5, 0.25]], dtype=F64).log()
TEACHER_LOGPROBS_B_T = torch.tensor([[0.25, 0.25, 1.0], [0.5, 0.125, 0.5]], dtype=F64).log()
LOSS_MASK_B_T = torch.tensor([[True, True, True], [True, False, True]])

# reverse KL: f(u) = -l, u f'(u) = -1.  forward KL: f(u) = u l, u f'(u) = u (l + 1).
# OPD:  A_t = -sum_{t' >= t, masked in} gamma^(k(t') - k(t)) f(u_t')   (k counts loss tokens only)
# OPD+: A_t = OPD + u_t f'(u_t);  masked positions are 0.
EXPECTED = {
    # gamma 0: A = -f = l
    ("reverse_kl", "opd", 0.0): [[-LN2, 0.0, LN2], [LN2, 0.0, LN2]],
    # gamma 0: A = l - 1
    ("reverse_kl", "opd_plus", 0.0): [[-LN2 - 1, -1.0, LN2 - 1], [LN2 - 1, 0.0, LN2 - 1]],
    # gamma 1: A = sum of l from t on; row 0: (-ln2 + 0 + ln2, 0 + ln2, ln2), row 1: (ln2 + ln2, -, ln2)
    ("reverse_kl", "opd", 1.0): [[0.0, LN2, LN2], [2 * LN2, 0.0, LN2]],
    # gamma 1: the same minus 1 on loss tokens
    ("reverse_kl", "opd_plus", 1.0): [[-1.0, LN2 - 1, LN2 - 1], [2 * LN2 - 1, 0.0, LN2 - 1]],
    # gamma 0.5: row 0: A_2 = ln2, A_1 = 0 + 0.5 ln2, A_0 = -ln2 + 0.5 (0.5 ln2) = -0.75 ln2;
    # row 1: the masked token does not advance time, so A_0 = ln2 + 0.5 ln2 (not ln2 + 0.25 ln2)
    ("reverse_kl", "opd", 0.5): [[-0.75 * LN2, 0.5 * LN2, LN2], [1.5 * LN2, 0.0, LN2]],
    # gamma 0: A = -u l; row 0: (-(0.5)(-ln2), 0, -(2)(ln2)), row 1: (-2 ln2, -, -2 ln2)
    ("forward_kl", "opd", 0.0): [[0.5 * LN2, 0.0, -2 * LN2], [-2 * LN2, 0.0, -2 * LN2]],
    # gamma 0: A = -u l + u (l + 1) = u
    ("forward_kl", "opd_plus", 0.0): [[0.5, 1.0, 2.0], [2.0, 0.0, 2.0]],
    # gamma 1: f = u l = row 0 (-0.5 ln2, 0, 2 ln2), row 1 (2 ln2, -, 2 ln2); A = minus the sum from t on
    ("forward_kl", "opd", 1.0): [[-1.5 * LN2, -2 * LN2, -2 * LN2], [-4 * LN2, 0.0, -2 * LN2]],
    # gamma 1: plus u (l + 1) = row 0 (0.5 (1 - ln2), 1, 2 (1 + ln2)), row 1 (2 (1 + ln2), -, 2 (1 + ln2))
    ("forward_kl", "opd_plus", 1.0): [[0.5 - 2 * LN2, 1 - 2 * LN2, 2.0], [2 - 2 * LN2, 0.0, 2.0]],
}


@pytest.mark.parametrize(("divergence", "estimator", "gamma"), sorted(EXPECTED), ids=lambda x: str(x))
def test_advantages_on_a_2x3_batch(divergence, estimator, gamma):
    got_B_T = advantages(
        STUDENT_LOGPROBS_B_T,
        TEACHER_LOGPROBS_B_T,
        LOSS_MASK_B_T,
        divergence=divergence,
        estimator=estimator,
        gamma=gamma,
    )
    expected_B_T = torch.tensor(EXPECTED[(divergence, estimator, gamma)], dtype=F64)
    torch.testing.assert_close(got_B_T, expected_B_T, rtol=1e-12, atol=1e-12)


# policy_loss: rho = exp(student - sampler) and A chosen directly; row 1, position 1 is masked, N = 5.
#   rho: row 0 (1.5, 1.0, 0.5), row 1 (1.5, 2.0, 1.25);  A: row 0 (1, -2, -0.5), row 1 (-1, 3, 2)
SAMPLER_LOGPROBS_B_T = torch.full((2, 3), math.log(0.5), dtype=F64)
RATIO_B_T = [[1.5, 1.0, 0.5], [1.5, 2.0, 1.25]]
LOSS_STUDENT_LOGPROBS_B_T = torch.tensor([[0.5 * r for r in row] for row in RATIO_B_T], dtype=F64).log()
ADVANTAGES_B_T = torch.tensor([[1.0, -2.0, -0.5], [-1.0, 3.0, 2.0]], dtype=F64)


def _policy_loss(**kwargs):
    student_B_T = LOSS_STUDENT_LOGPROBS_B_T.clone().requires_grad_(True)
    loss = policy_loss(student_B_T, SAMPLER_LOGPROBS_B_T, ADVANTAGES_B_T, LOSS_MASK_B_T, **kwargs)
    loss.backward()
    assert student_B_T.grad is not None
    return loss.item(), student_B_T.grad


def test_policy_loss_without_clipping():
    # rho A = (1.5, -2, -0.25; -1.5, masked, 2.5), sum 0.25, loss = -0.25 / 5
    # d loss / d log pi = -(1/5) rho A
    loss, grad_B_T = _policy_loss()
    assert loss == pytest.approx(-0.05, abs=1e-12)
    expected_grad_B_T = torch.tensor([[-0.3, 0.4, 0.05], [0.3, 0.0, -0.5]], dtype=F64)
    torch.testing.assert_close(grad_B_T, expected_grad_B_T, rtol=1e-12, atol=1e-12)


def test_policy_loss_with_a_normalizer():
    # the same sum over a whole step of 10 loss tokens: -0.25 / 10
    loss, _ = _policy_loss(normalizer=10.0)
    assert loss == pytest.approx(-0.025, abs=1e-12)


def test_policy_loss_with_clipping():
    # eps = 0.2, clip(rho) in [0.8, 1.2]; min(rho A, clip(rho) A) per token:
    #   (1.5, A 1):    min(1.5, 1.2)     = 1.2   clipped branch: no gradient
    #   (1.0, A -2):   min(-2, -2)       = -2    ratio inside the range: gradient -(1/5)(-2) = 0.4
    #   (0.5, A -0.5): min(-0.25, -0.4)  = -0.4  clipped branch: no gradient
    #   (1.5, A -1):   min(-1.5, -1.2)   = -1.5  unclipped branch: gradient -(1/5)(-1.5) = 0.3
    #   (1.25, A 2):   min(2.5, 2.4)     = 2.4   clipped branch: no gradient
    # sum = 1.2 - 2 - 0.4 - 1.5 + 2.4 = -0.3, loss = 0.3 / 5
    loss, grad_B_T = _policy_loss(clip_eps=0.2)
    assert loss == pytest.approx(0.06, abs=1e-12)
    expected_grad_B_T = torch.tensor([[0.0, 0.4, 0.0], [0.3, 0.0, 0.0]], dtype=F64)
    torch.testing.assert_close(grad_B_T, expected_grad_B_T, rtol=1e-12, atol=1e-12)
