"""How sure a score, a difference of scores and a rank correlation are, from the questions they were
measured on (scipy's bootstrap and permutation test; fixed seeds, so a report is reproducible).

A score is recomputed from per-question items: ``"yes_no_f1"`` items are ``{"prediction",
"answer"}`` pairs (F1 of "yes", ``otprune.benchmark_metrics.yes_no_f1``), ``"exact_match"`` items
0 or 1 (their mean). Intervals are percentile bootstrap intervals over questions; two methods
answered the same questions, so their difference is resampled paired: the same questions for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import bootstrap, permutation_test, rankdata

__all__ = ["CONFIDENCE", "METRICS", "PAIRINGS", "Interval", "RankCorrelation", "difference_interval", "score_interval", "spearman_test"]

CONFIDENCE = 0.95
RESAMPLES = 9999
SEED = 20261207
# Every pairing up to 9 values (9! = 362 880); above, that many random pairings (12! would be 479
# million: the hypothesis across every method and ratio of a run).
EXACT_PAIRINGS = math.factorial(9)
PAIRINGS = f"p = : exact, over every pairing, for n <= 9; p ~ : over {EXACT_PAIRINGS} random pairings above"
METRICS = ("yes_no_f1", "exact_match")


@dataclass(frozen=True)
class Interval:
    """A statistic's value on the questions and its bootstrap interval ``[low, high]``."""

    value: float
    low: float
    high: float
    questions: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def sign(self) -> int:
        """+1 or -1 when the interval lies on one side of 0, else 0 (no difference shown)."""
        return 0 if not self.excludes_zero() else (1 if self.low > 0 else -1)


def _columns(metric: str, items: list) -> tuple[np.ndarray, ...]:
    """The items as numeric columns a vectorised statistic can resample."""
    if metric == "yes_no_f1":
        return (np.array([item["prediction"] == "yes" for item in items], float), np.array([item["answer"] == "yes" for item in items], float))
    if metric == "exact_match":
        return (np.array([float(item) for item in items]),)
    raise ValueError(f"metric {metric!r} has no per-question score here; allowed: {', '.join(METRICS)}")


def _score(metric: str, columns, axis=-1):
    """The metric over (resampled) columns, along ``axis``, as a fraction."""
    if metric == "exact_match":
        return np.mean(columns[0], axis=axis)
    predicted, actual = columns
    both = np.sum(predicted * actual, axis=axis)
    total = np.sum(predicted, axis=axis) + np.sum(actual, axis=axis)
    return np.divide(2 * both, total, out=np.zeros_like(both, dtype=float), where=total > 0)


def _interval(columns: tuple[np.ndarray, ...], statistic, scale: float) -> Interval:
    value = float(statistic(*columns, axis=-1)) * scale
    if len(columns[0]) < 2:
        return Interval(value, math.nan, math.nan, len(columns[0]))
    result = bootstrap(columns, statistic, paired=True, vectorized=True, n_resamples=RESAMPLES, confidence_level=CONFIDENCE,
                       method="percentile", rng=np.random.default_rng(SEED))  # fmt: skip
    low, high = result.confidence_interval
    return Interval(value, float(low) * scale, float(high) * scale, len(columns[0]))


def score_interval(metric: str, items: list, scale: float = 100.0) -> Interval:
    """The score of ``items`` (in the report's unit: a fraction times ``scale``) with its interval."""
    columns = _columns(metric, items)

    def statistic(*resampled, axis=-1):
        return _score(metric, resampled, axis)

    return _interval(columns, statistic, scale)


def difference_interval(metric: str, ours: dict, theirs: dict, scale: float = 100.0) -> Interval:
    """``score(ours) - score(theirs)`` over the questions both answered (``{question id: item}``),
    the same questions resampled for both."""
    shared = sorted(set(ours) & set(theirs))
    if not shared:
        raise ValueError("the two methods share no question: their difference has no paired interval")
    a, b = _columns(metric, [ours[q] for q in shared]), _columns(metric, [theirs[q] for q in shared])
    width = len(a)

    def statistic(*resampled, axis=-1):
        return _score(metric, resampled[:width], axis) - _score(metric, resampled[width:], axis)

    return _interval(a + b, statistic, scale)


@dataclass(frozen=True)
class RankCorrelation:
    """Spearman's rho over ``n`` pairs and its two-sided permutation p-value: ``exact`` over every
    pairing of the n values (n <= 9), else over ``EXACT_PAIRINGS`` random ones (fixed seed);
    ``nan`` when n < 3 or a side is constant."""

    rho: float
    p: float
    n: int
    exact: bool = True


def _rho(x, y, axis=-1):
    rx, ry = rankdata(x, axis=axis), rankdata(y, axis=axis)
    rx = rx - rx.mean(axis=axis, keepdims=True)
    ry = ry - ry.mean(axis=axis, keepdims=True)
    return np.sum(rx * ry, axis=axis) / np.sqrt(np.sum(rx**2, axis=axis) * np.sum(ry**2, axis=axis))


def spearman_test(x, y) -> RankCorrelation:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) != len(y):
        raise ValueError(f"x and y must pair up; got {len(x)} and {len(y)} values")
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return RankCorrelation(math.nan, math.nan, len(x))

    # One sample, y, re-paired with the fixed x (scipy's documented form for a correlation: two
    # samples would be permuted both, n!^2 orders).
    def statistic(paired_y, axis=-1):
        return _rho(x, paired_y, axis)

    exact = math.factorial(len(x)) <= EXACT_PAIRINGS
    result = permutation_test((y,), statistic, permutation_type="pairings", vectorized=True, alternative="two-sided",
                              n_resamples=np.inf if exact else EXACT_PAIRINGS, rng=np.random.default_rng(SEED))  # fmt: skip
    return RankCorrelation(float(result.statistic), float(result.pvalue), len(x), exact)
