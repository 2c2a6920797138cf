"""The forgetting study's statistics on values worked out by hand or taken from textbooks."""
import math
import random

import pytest

from qadapter_kernels.evaluation.paired_stats import bootstrap_mean_ci, mcnemar, mcnemar_exact, seed_mean_ci


def test_mcnemar_exact_matches_the_binomial_tail():
    # 2 vs 8 discordant: 2 * P(X <= 2 | n=10, p=1/2) = 2 * (1 + 10 + 45) / 1024.
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)  # two-sided: symmetric
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(4, 4) == 1.0  # capped at 1
    # Textbook (Agresti, presidential approval: 150 vs 86 discordant): chi-square 17.36, p ~ 3e-5.
    assert 1e-5 < mcnemar_exact(150, 86) < 6e-5


def test_mcnemar_counts_only_discordant_items():
    base = [True, True, False, False, True, True]
    tuned = [True, False, False, True, False, False]
    result = mcnemar(base, tuned)
    assert (result.only_first, result.only_second) == (3, 1)
    assert result.p_value == pytest.approx(2 * (1 + 4) / 16)
    with pytest.raises(ValueError, match="same items"):
        mcnemar([True], [True, False])
    with pytest.raises(ValueError, match="only_first"):
        mcnemar_exact(-1, 2)


def test_bootstrap_ci_of_a_mean_covers_it_with_the_normal_width():
    rng = random.Random(1)
    values = [rng.gauss(0.5, 2.0) for _ in range(400)]
    mean, low, high = bootstrap_mean_ci(values, resamples=4000, seed=3)
    assert mean == pytest.approx(sum(values) / len(values))
    se = 2.0 / math.sqrt(400)
    assert low < mean < high
    assert (high - low) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert bootstrap_mean_ci(values, seed=3) == bootstrap_mean_ci(values, seed=3)  # seeded


def test_paired_bootstrap_separates_a_consistent_shift_from_noise():
    rng = random.Random(2)
    base = [rng.gauss(0, 3) for _ in range(300)]
    shifted = [b - 0.5 + rng.gauss(0, 0.2) for b in base]  # every item a little lower
    _, low, high = bootstrap_mean_ci([s - b for s, b in zip(shifted, base)])
    assert high < 0 and low > -0.6
    _, low, high = bootstrap_mean_ci([0.0] * 50)
    assert low == high == 0.0


def test_weighted_mean_is_a_ratio_of_sums():
    # Per prompt: mean KL per token and its token count; the weighted mean is total KL / total tokens.
    mean, _, _ = bootstrap_mean_ci([1.0, 3.0], weights=[3, 1])
    assert mean == pytest.approx((1 * 3 + 3 * 1) / 4)
    with pytest.raises(ValueError, match="weights"):
        bootstrap_mean_ci([1.0, 2.0], weights=[1.0])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean_ci([])


def test_seed_mean_ci_uses_student_t():
    mean, low, high = seed_mean_ci([1.0, 2.0, 3.0])  # sd 1, se 1/sqrt(3), t(0.975, 2) = 4.303
    assert mean == 2.0 and high - mean == pytest.approx(4.303 / math.sqrt(3))
    assert seed_mean_ci([5.0]) == (5.0, 5.0, 5.0)
    _, low, high = seed_mean_ci([1.0, 3.0])  # t(0.975, 1) = 12.706, se 1
    assert (low, high) == pytest.approx((2 - 12.706, 2 + 12.706))
