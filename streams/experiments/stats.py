"""The statistics of an experiment report, from the counts' sufficient statistics over users.

Every A/B metric is a ratio of two user totals summed over the variant's users (clicks per list, hits
per engagement). Users are the unit of assignment, so the variance is taken over users (the delta
method), not over lists: a few heavy users cannot make a difference look surer than it is. Two variants
are compared with a two-sided z-test on the difference of their ratios.

Interleaving compares two rankers within each user: a user prefers the team whose items earned more
of their credited engagements; the preferences are tested against a fair coin (two-sided binomial).

Next to each fixed-sample p-value, a sequential one that stays valid however often the report is read
(a mixture sequential probability ratio test, Johari et al., "Always valid inference", 2017): the report
keeps its running minimum over the report buckets, and stopping the first time it falls below 0.05
keeps the false-positive rate at 5%, where stopping at the first fixed p-value below 0.05 does not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import special
from scipy import stats as scipy_stats

from streams.experiments.attribution import N_TOTALS, PAIRS, TOTALS

Z_95 = 1.959963984540054
# The sequential test's mixture over effects: a normal of this share of the control's value (for A/B metrics),
# a uniform over the preference share (interleaving). Any choice keeps the test valid; it sets which
# effects it finds soonest (about this size).
MIXTURE_SHARE = 0.1
# Each A/B metric: (name, numerator total, denominator total, what it means).
METRICS = (
    ("ctr", "clicks", "lists", "credited clicks per list served"),
    ("conversion_rate", "conversions", "lists", "credited add-to-carts and purchases per list served"),
    ("hit_rate", "hits", "engagements", "share of the users' engagements whose item was in a recent list (hit rate@k)"),
    ("mrr", "reciprocal_ranks", "hits", "mean reciprocal rank of the credited items"),
)


@dataclass(frozen=True)
class Ratio:
    value: float
    se: float  # standard error over users (delta method); nan where it cannot be told

    @property
    def interval(self) -> tuple[float, float]:
        return self.value - Z_95 * self.se, self.value + Z_95 * self.se


@dataclass(frozen=True)
class Comparison:
    difference: float  # variant minus control
    interval: tuple[float, float]  # its 95% confidence interval
    relative: float  # difference / control's value
    p_value: float
    sequential_p: float = math.nan  # the mixture SPRT's at this look (the report keeps the running minimum)


def _moments(stats: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Users, the mean of each total, and the sample covariance matrix of the totals over users."""
    n = float(stats[0])
    sums = stats[1 : 1 + N_TOTALS]
    products = np.zeros((N_TOTALS, N_TOTALS))
    products[PAIRS] = stats[1 + N_TOTALS :]
    products = products + np.triu(products, 1).T
    mean = sums / n if n > 0 else np.zeros(N_TOTALS)
    cov = (products - n * np.outer(mean, mean)) / (n - 1) if n > 1 else np.full((N_TOTALS, N_TOTALS), np.nan)
    return n, mean, cov


def ratio(stats: np.ndarray, numerator: str, denominator: str) -> Ratio:
    """sum(numerator) / sum(denominator) over the users in ``stats``, with its standard error."""
    n, mean, cov = _moments(stats)
    i, j = TOTALS.index(numerator), TOTALS.index(denominator)
    if n == 0 or mean[j] == 0:
        return Ratio(math.nan, math.nan)
    r = mean[i] / mean[j]
    variance = (cov[i, i] - 2 * r * cov[i, j] + r * r * cov[j, j]) / (n * mean[j] ** 2)
    return Ratio(float(r), float(math.sqrt(max(variance, 0.0))) if n > 1 else math.nan)


def compare(control: Ratio, variant: Ratio) -> Comparison:
    difference = variant.value - control.value
    se = math.hypot(control.se, variant.se)
    if not math.isfinite(se) or se == 0:
        p = math.nan if not math.isfinite(difference) or difference != 0 else 1.0
        return Comparison(difference, (math.nan, math.nan), _relative(difference, control.value), p)
    p = float(2 * scipy_stats.norm.sf(abs(difference) / se))
    interval = (difference - Z_95 * se, difference + Z_95 * se)
    sequential = mixture_p(difference, se, MIXTURE_SHARE * abs(control.value))
    return Comparison(difference, interval, _relative(difference, control.value), p, sequential)


def mixture_p(difference: float, se: float, tau: float) -> float:
    """1 / the likelihood ratio of a normal mixture (sd ``tau``) of effects against none, at most 1."""
    if not (math.isfinite(difference) and math.isfinite(se) and se > 0 and tau > 0):
        return math.nan
    v, t2 = se * se, tau * tau
    log_ratio = 0.5 * math.log(v / (v + t2)) + difference * difference * t2 / (2 * v * (v + t2))
    return float(min(1.0, math.exp(-log_ratio)))


@dataclass(frozen=True)
class Preference:
    """Interleaving: how many users preferred each team, and whether the split departs from a coin."""

    first: int
    second: int
    tied: int
    p_value: float
    sequential_p: float = math.nan  # a uniform mixture over the preference share against a fair coin

    @property
    def first_share(self) -> float:
        """Of the users with a preference, the share preferring the first variant."""
        decided = self.first + self.second
        return self.first / decided if decided else math.nan


def preference(counts: np.ndarray) -> Preference:
    first, second, tied = (round(float(c)) for c in counts)
    decided = first + second
    if not decided:
        return Preference(first, second, tied, math.nan)
    p = float(scipy_stats.binomtest(first, decided, 0.5).pvalue)
    # The likelihood ratio of a uniform prior on the share against 1/2: 2^n B(first + 1, second + 1).
    log_ratio = decided * math.log(2) + float(special.betaln(first + 1, second + 1))
    return Preference(first, second, tied, p, float(min(1.0, math.exp(-log_ratio))))


def _relative(difference: float, base: float) -> float:
    return difference / base if base and math.isfinite(base) else math.nan
