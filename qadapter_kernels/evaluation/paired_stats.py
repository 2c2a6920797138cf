"""Paired statistics for comparing a policy with its base model item by item, and seeds with each other.

- ``mcnemar_exact``: the exact (binomial) McNemar test on the discordant pairs of two paired accuracies.
- ``bootstrap_mean_ci``: a percentile bootstrap CI of a (weighted) mean over items; given the per-item
  differences of two policies it is the paired bootstrap.
- ``seed_mean_ci``: mean and Student-t 95% CI over a few seeds.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

__all__ = ["Interval", "McNemar", "bootstrap_mean_ci", "mcnemar", "mcnemar_exact", "seed_mean_ci"]

# Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom (the usual table's column).
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
          2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
          2.045, 2.042)


class Interval(NamedTuple):
    """An estimate and its two-sided 95% confidence interval."""

    mean: float
    low: float
    high: float


class McNemar(NamedTuple):
    """Discordant counts of two paired binary outcomes and the exact two-sided p-value."""

    only_first: int  # items right under the first policy only (e.g. the base model)
    only_second: int  # items right under the second policy only
    p_value: float


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided exact McNemar p-value: under H0 the discordant items split as Binomial(n, 1/2)."""
    for name, value in (("only_first", only_first), ("only_second", only_second)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> McNemar:
    """The exact McNemar test of two policies' per-item correctness (same items, same order)."""
    if len(first) != len(second):
        raise ValueError(f"first and second must score the same items, got {len(first)} and {len(second)}")
    only_first = sum(bool(a) and not bool(b) for a, b in zip(first, second))
    only_second = sum(bool(b) and not bool(a) for a, b in zip(first, second))
    return McNemar(only_first, only_second, mcnemar_exact(only_first, only_second))


def bootstrap_mean_ci(values: Sequence[float], weights: Sequence[float] | None = None, *,
                      resamples: int = 4000, seed: int = 0) -> Interval:
    """Weighted mean ``sum(w v) / sum(w)`` of ``values`` with a percentile-bootstrap 95% CI over items.

    ``weights``: one per value (e.g. tokens per prompt, so the mean is per token); None: all 1.
    Paired use: pass the per-item differences of two policies (same items): the CI of the mean change.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"values must be a non-empty 1-D sequence, got shape {v.shape}")
    w = np.ones_like(v) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != v.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError("weights must be non-negative, one per value, with a positive sum")
    if resamples < 100:
        raise ValueError(f"resamples must be >= 100, got {resamples}")
    index = np.random.default_rng(seed).integers(0, v.size, size=(resamples, v.size))
    wv, ww = (w * v)[index].sum(1), w[index].sum(1)
    means = np.divide(wv, ww, out=np.zeros_like(wv), where=ww > 0)
    low, high = np.quantile(means, [0.025, 0.975])
    return Interval(float((w * v).sum() / w.sum()), float(low), float(high))


def seed_mean_ci(values: Sequence[float]) -> Interval:
    """Mean over seeds with a Student-t 95% CI (a single seed: the interval is the point)."""
    if len(values) == 0:
        raise ValueError("values must hold at least one seed's value")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return Interval(mean, mean, mean)
    df = len(values) - 1
    t = _T_975[df - 1] if df <= len(_T_975) else 1.96
    half = t * statistics.stdev(values) / math.sqrt(len(values))
    return Interval(mean, mean - half, mean + half)
