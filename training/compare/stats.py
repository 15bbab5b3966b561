"""The statistics of a comparison: t confidence intervals over seeds and the claims' verdicts.

The t quantile is computed here (the regularised incomplete beta function by its continued
fraction, then bisection) rather than taken from SciPy, which is not a dependency of hf_fusion;
the tests check it against published table values.

A verdict reads the 95% interval of the mean *paired* difference between two variants (paired by
seed: both cells of a pair share the seed, hence the data order and the tokenizer), so that
seed-to-seed spread common to both variants cancels:

- ``greater`` (a beats b): reproduced when the interval lies above 0, contradicted when it lies
  below 0, not significant otherwise;
- ``close`` (a within ``margin`` of b): reproduced when the interval lies above ``-margin``,
  contradicted when it lies below it, not significant otherwise (the report may derive the
  margin from b's mean, ``relative_margin``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

CONFIDENCE = 0.95
# Metrics where lower is better (a difference is taken as b - a, so that "a beats b" is positive).
LOWER_IS_BETTER = ("nll",)
CLAIM_KINDS = ("greater", "close")


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's evaluation of the continued fraction of I_x(a, b) (Numerical Recipes' betacf)."""
    tiny, epsilon = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < epsilon:
            break
    return result


def regularized_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * regularized_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(probability: float, df: float) -> float:
    """The ``probability`` quantile of Student's t (bisection on :func:`t_cdf`)."""
    if not 0.0 < probability < 1.0 or df <= 0:
        raise ValueError(f"t_quantile needs 0 < probability < 1 and df > 0, got {probability}, {df}.")
    if probability < 0.5:
        return -t_quantile(1.0 - probability, df)
    low, high = 0.0, 1.0
    while t_cdf(high, df) < probability:
        high *= 2.0
    for _ in range(200):
        middle = (low + high) / 2.0
        low, high = (middle, high) if t_cdf(middle, df) < probability else (low, middle)
    return (low + high) / 2.0


@dataclass(frozen=True)
class Interval:
    """A mean with its t confidence interval over ``n`` values (``half`` is NaN below 2 values)."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def format(self, digits: int = 2) -> str:
        if math.isnan(self.mean):
            return "–"
        if math.isnan(self.half):
            return f"{self.mean:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {self.half:.{digits}f}"


def mean_interval(values: Sequence[float], confidence: float = CONFIDENCE) -> Interval:
    """Mean ± t_{(1+c)/2, n-1} · s / √n (s: the sample standard deviation)."""
    n = len(values)
    if n == 0:
        return Interval(math.nan, math.nan, 0)
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, math.nan, n)
    deviation = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1))
    return Interval(mean, t_quantile((1.0 + confidence) / 2.0, n - 1) * deviation / math.sqrt(n), n)


def verdict(difference: Interval, kind: str, margin: float = 0.0) -> str:
    """The claim's verdict from the interval of the paired difference (see the module docstring)."""
    if kind not in CLAIM_KINDS:
        raise ValueError(f"claim kind = {kind!r} is not supported; allowed: {', '.join(CLAIM_KINDS)}.")
    if difference.n < 2 or math.isnan(difference.half):
        return "pending"
    threshold = 0.0 if kind == "greater" else -margin
    if difference.low > threshold:
        return "reproduced"
    if difference.high < threshold:
        return "contradicted"
    return "not significant"
