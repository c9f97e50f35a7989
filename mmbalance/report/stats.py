"""Summaries over seeds and paired comparisons between methods.

Spread is reported as a 95 % confidence interval of the mean, never as a bare standard deviation:
with ``n`` seeds, sample mean ``m`` and sample standard deviation ``s`` (``n - 1`` in the
denominator), the interval is ``m ± t_{0.975, n-1} · s / √n`` (Student's t, which is what makes
three seeds honest: ``t_{0.975, 2} = 4.30``, not 2).

Paired comparison of a method with a reference (``joint``): on the seeds both ran,
``d_s = value_method(s) - value_reference(s)``; the report gives ``mean(d)`` with its t interval
and the two-sided p-value of the paired t-test (``scipy.stats.ttest_rel``). Comparing many
methods with one reference is many tests, so the p-values are Holm-adjusted over the methods
compared (the family), and a difference is called significant when its adjusted p-value is below
``alpha`` (0.05). Holm (1979): sort the ``k`` p-values ascending, multiply the ``i``-th
(1-based) by ``k - i + 1``, take the running maximum and cap it at 1; it controls the
family-wise error rate without assuming independence.

How many seeds a difference needs (:func:`seeds_for_significance`). With ``n`` seeds and a Holm
family of ``k`` tests, the smallest p-value is compared with ``alpha / k``, so a paired difference
is significant only when ``|mean(d)| / sd(d) >= t_{1 - alpha / (2k), n-1} / √n``
(:func:`required_ratio`; 7.2 for 3 seeds and 8 methods). For planning, the number of seeds at
which a difference with the observed mean and paired standard deviation would be significant
with probability :data:`POWER` (80 %) at that level: the power of the two-sided one-sample t-test
is ``P(|T| > t_c)`` for ``T`` a noncentral t with ``n - 1`` degrees of freedom and noncentrality
``√n · mean / sd``. Using ``alpha / k`` for every method is Holm's first (strictest) step: the
estimate is for the method to be significant whatever the others do.

scipy is imported when an interval or a test is first computed, so that importing the report (as
``compare`` does for its records) costs no scipy.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Confidence level of every interval in a report.
LEVEL = 0.95
#: Family-wise error rate of the Holm-corrected paired tests.
ALPHA = 0.05
#: Probability of significance that :func:`seeds_for_significance` plans for.
POWER = 0.8
#: The largest number of seeds :func:`seeds_for_significance` reports.
MAX_SEEDS = 100


@dataclass(frozen=True)
class Stat:
    """Mean over seeds with its t-based confidence interval (``half_width`` is NaN for n < 2)."""

    mean: float
    std: float
    n: int
    half_width: float

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width


def t_half_width(std: float, n: int, level: float = LEVEL) -> float:
    """Half-width ``t_{(1+level)/2, n-1} · std / √n`` of the t interval of a mean (NaN if n < 2)."""
    if n < 2:
        return math.nan
    from scipy import stats

    return float(stats.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)


def _finite(value: Any) -> float | None:
    """``value`` as a float if it is a finite number, else None (NaN, infinite, not a number:
    edited files may hold anything)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        value = float(value)
    except OverflowError:  # an int beyond any float
        return None
    return value if math.isfinite(value) else None


def describe(values: Iterable[float | None]) -> Stat | None:
    """Mean, sample std, count and 95 % t interval of the finite ``values`` (None if none).

    Values near the largest float (1e308, in an edited file) overflow the sums: they are then
    averaged scaled by their largest magnitude."""
    v = [x for x in map(_finite, values) if x is not None]
    if not v:
        return None
    try:
        mean = statistics.fmean(v)
        std = statistics.stdev(v) if len(v) > 1 else 0.0
    except OverflowError:
        scale = max(abs(x) for x in v)
        u = [x / scale for x in v]
        mean = statistics.fmean(u) * scale
        std = (statistics.stdev(u) if len(u) > 1 else 0.0) * scale
    return Stat(mean, std, len(v), t_half_width(std, len(v)))


def by_seed(
    records: Iterable[Mapping[str, Any]], metric: str, split: str = "test"
) -> dict[str, dict[int, float]]:
    """``{method: {seed: value}}`` of one metric on one split (methods in first-seen order)."""
    out: dict[str, dict[int, float]] = {}
    for r in records:
        value = _finite(r["value"])
        if r["split"] == split and r["metric"] == metric and value is not None:
            out.setdefault(r["method"], {})[int(r["seed"])] = value
    return out


def summarize(
    records: Sequence[Mapping[str, Any]], split: str = "test"
) -> dict[str, dict[str, Stat]]:
    """``{method: {metric: Stat}}`` over seeds for one split (methods in first-seen order)."""
    values: dict[str, dict[str, list[float]]] = {}
    for r in records:
        if r["split"] == split and r["value"] is not None:
            values.setdefault(r["method"], {}).setdefault(r["metric"], []).append(r["value"])
    out: dict[str, dict[str, Stat]] = {}
    for method, metrics in values.items():
        stats = {metric: describe(v) for metric, v in metrics.items()}
        out[method] = {k: s for k, s in stats.items() if s is not None}
    return out


def holm(pvalues: Mapping[str, float]) -> dict[str, float]:
    """Holm-adjusted p-values of a family of tests (NaN p-values are left out of the family)."""
    family = sorted((p, key) for key, p in pvalues.items() if not math.isnan(p))
    k = len(family)
    adjusted: dict[str, float] = {}
    running = 0.0
    for i, (p, key) in enumerate(family):
        running = max(running, min(1.0, (k - i) * p))
        adjusted[key] = running
    return {key: adjusted.get(key, math.nan) for key in pvalues}


@dataclass(frozen=True)
class PairedTest:
    """A method minus the reference on shared seeds: paired t-test, Holm-adjusted over methods."""

    reference: str
    n: int
    mean_diff: float
    half_width: float
    p: float
    p_holm: float
    significant: bool
    #: sample standard deviation of the paired differences (NaN for one pair)
    std: float = math.nan


def _paired_p(diffs: Sequence[float]) -> float:
    """Two-sided p-value of the paired t-test of ``diffs`` (NaN for fewer than two pairs).

    Identical differences have no spread: the p-value is 1 when they are all zero and 0 otherwise
    (the t statistic is 0/0 or infinite there; scipy returns NaN for the first)."""
    if len(diffs) < 2:
        return math.nan
    if statistics.pstdev(diffs) == 0.0:
        return 1.0 if diffs[0] == 0.0 else 0.0
    from scipy import stats

    return float(stats.ttest_1samp(diffs, 0.0).pvalue)


def paired_tests(
    records: Sequence[Mapping[str, Any]],
    metric: str = "accuracy",
    reference: str = "joint",
    split: str = "test",
    alpha: float = ALPHA,
) -> dict[str, PairedTest]:
    """``{method: PairedTest}`` of ``metric`` against ``reference`` for every other method that
    shares a seed with it; empty when the reference is absent. The Holm family is every method
    with at least two shared seeds (a single pair has no test)."""
    values = by_seed(records, metric, split)
    if reference not in values:
        return {}
    ref = values[reference]
    diffs = {
        method: [v[s] - ref[s] for s in sorted(v) if s in ref and math.isfinite(v[s] - ref[s])]
        for method, v in values.items()
        if method != reference
    }
    diffs = {m: d for m, d in diffs.items() if d}
    raw = {m: _paired_p(d) for m, d in diffs.items()}
    adjusted = holm(raw)
    out = {}
    for method, d in diffs.items():
        stat = describe(d)
        assert stat is not None
        out[method] = PairedTest(
            reference,
            len(d),
            stat.mean,
            stat.half_width,
            raw[method],
            adjusted[method],
            bool(adjusted[method] < alpha),  # NaN compares False: no test, not significant
            stat.std if stat.n > 1 else math.nan,
        )
    return out


def required_ratio(n: int, family: int, alpha: float = ALPHA) -> float:
    """``|mean(d)| / sd(d)`` that a paired difference over ``n`` seeds needs to be significant
    at Holm's first step over ``family`` tests: ``t_{1 - alpha / (2 family), n-1} / √n``
    (NaN for fewer than two seeds)."""
    if n < 2 or family < 1:
        return math.nan
    from scipy import stats

    return float(stats.t.ppf(1 - alpha / (2 * family), n - 1)) / math.sqrt(n)


def significance_power(ratio: float, n: int, family: int, alpha: float = ALPHA) -> float:
    """Probability that a paired difference whose true ``mean / sd`` is ``ratio`` is significant
    over ``n`` seeds at Holm's first step over ``family`` tests (two-sided t-test)."""
    if n < 2:
        return 0.0
    from scipy import stats

    critical = float(stats.t.ppf(1 - alpha / (2 * family), n - 1))
    shift = abs(ratio) * math.sqrt(n)
    t = stats.nct(n - 1, shift)
    value = float(t.sf(critical) + t.cdf(-critical))
    if not math.isfinite(value):  # scipy's noncentral t gives NaN far in its tails
        value = float(stats.norm.sf(critical - shift) + stats.norm.cdf(-critical - shift))
    return min(max(value, 0.0), 1.0)


def seeds_for_significance(
    mean_diff: float,
    std: float,
    family: int,
    alpha: float = ALPHA,
    power: float = POWER,
    most: int = MAX_SEEDS,
) -> int | None:
    """The fewest seeds (at least 2) at which a paired difference with this mean and standard
    deviation is significant after Holm's correction over ``family`` tests with probability
    ``power``; ``None`` when not within ``most`` seeds (or the difference is 0). A difference
    without spread (``std`` 0) is significant from two seeds on."""
    if mean_diff == 0 or not math.isfinite(mean_diff) or math.isnan(std):
        return None
    if std == 0:
        return 2
    ratio = abs(mean_diff) / std
    low, high = 2, most
    if significance_power(ratio, high, family, alpha) < power:
        return None
    while low < high:  # the power grows with n: the first n that reaches it
        mid = (low + high) // 2
        if significance_power(ratio, mid, family, alpha) >= power:
            high = mid
        else:
            low = mid + 1
    return low
