"""Combining per-process metrics into the global ones (what rank 0 writes)."""

import math

import pytest

from opdplus.train.distributed import combine_metrics


def test_sums_extremes_weighted_means_and_pooled_std():
    a = {
        "perf/sample_tok_s": 10.0,
        "rollout/tokens": 30.0,
        "rollout/len_max": 7.0,
        "adv/min": -1.0,
        "div/reverse_kl": 0.5,
        "adv/mean": 0.0,
        "adv/std": 1.0,
    }
    b = {
        "perf/sample_tok_s": 20.0,
        "rollout/tokens": 10.0,
        "rollout/len_max": 9.0,
        "adv/min": -3.0,
        "div/reverse_kl": 1.5,
        "adv/mean": 2.0,
        "adv/std": 1.0,
    }
    out = combine_metrics([(30.0, a), (10.0, b)])
    assert out["perf/sample_tok_s"] == 30.0 and out["rollout/tokens"] == 40.0
    assert out["rollout/len_max"] == 9.0 and out["adv/min"] == -3.0
    assert out["div/reverse_kl"] == pytest.approx((30 * 0.5 + 10 * 1.5) / 40)
    # pooled: values 0 +- 1 (weight 3) and 2 +- 1 (weight 1): mean 0.5, E[x^2] = (3*1 + 1*5)/4 = 2
    assert out["adv/mean"] == pytest.approx(0.5) and out["adv/std"] == pytest.approx(math.sqrt(2 - 0.25))


def test_key_reported_by_some_ranks_only():
    out = combine_metrics([(4.0, {"div/math/reverse_kl": 0.2, "loss/policy": 1.0}), (2.0, {"loss/policy": 1.0})])
    assert out["div/math/reverse_kl"] == pytest.approx(0.2) and out["loss/policy"] == 1.0


def test_per_sequence_rollout_statistics_are_plain_means():
    out = combine_metrics([(30.0, {"rollout/len_mean": 15.0}), (10.0, {"rollout/len_mean": 5.0})])
    assert out["rollout/len_mean"] == 10.0
