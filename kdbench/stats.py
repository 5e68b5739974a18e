"""The leaderboard's statistics: pure functions on arrays of per-seed accuracies.

- :func:`summarize`: mean, sample std, n and the Student-t confidence interval of one cell.
- :func:`paired`: one row against another over the seeds they share: the mean difference, its
  t interval, the paired t-test p-value (``scipy.stats.ttest_rel``) and, for n ≤ 10 pairs, the
  exact sign-flip permutation p-value (:func:`sign_flip_p`).
- :func:`holm`: Holm's step-down adjustment of a family of p-values.
- :func:`pooled_sd` and :func:`minimal_detectable_difference`: the smallest true mean
  difference a paired t-test over n seeds detects with the given power, from the noncentral t
  distribution (``scipy.stats.nct``), solved for the effect size.

Nothing here reads files or knows about records; NaN never comes out where a value is
undefined: it is ``None`` (n = 1 has no spread, no interval and no test).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
from scipy import optimize, stats

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.8
MAX_EXACT_PERMUTATION = 10  # 2^10 = 1024 sign patterns; above that the t-test p is used


@dataclass(frozen=True)
class CellSummary:
    n: int
    mean: float | None
    std: float | None  # sample std (ddof = 1); None for n < 2
    ci_low: float | None  # Student-t interval of the mean; None for n < 2
    ci_high: float | None


@dataclass(frozen=True)
class Paired:
    n: int  # pairs (shared seeds)
    diff: float | None  # mean of a - b
    sd: float | None  # sample std of the differences; None for n < 2
    ci_low: float | None
    ci_high: float | None
    p_t: float | None  # paired t-test, two-sided; None for n < 2
    p_perm: float | None  # exact sign-flip permutation, two-sided; None for n < 2 or n > 10

    @property
    def p(self) -> float | None:
        """The p-value the leaderboard uses: the exact permutation p when n ≤ 10, else the
        t-test p."""
        return self.p_perm if self.p_perm is not None else self.p_t

    @property
    def test(self) -> str | None:
        if self.p_perm is not None:
            return "sign-flip"
        return "t" if self.p_t is not None else None


def _array(values: Iterable[float]) -> np.ndarray:
    a = np.asarray(list(values), dtype=float)
    if a.ndim != 1 or not np.all(np.isfinite(a)):
        raise ValueError("expected a 1-d array of finite numbers (drop failed runs first)")
    return a


def t_interval(mean: float, sd: float, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return float(mean - half), float(mean + half)


def summarize(values: Iterable[float], confidence: float = CONFIDENCE) -> CellSummary:
    """Mean, sample std and the two-sided Student-t interval of the mean (n - 1 degrees of
    freedom). n = 0: everything None; n = 1: the mean only."""
    a = _array(values)
    n = len(a)
    if n == 0:
        return CellSummary(0, None, None, None, None)
    mean = float(a.mean())
    if n == 1:
        return CellSummary(1, mean, None, None, None)
    sd = float(a.std(ddof=1))
    lo, hi = t_interval(mean, sd, n, confidence)
    return CellSummary(n, mean, sd, lo, hi)


def _tolerance(d: np.ndarray) -> float:
    """Accuracies are multiples of 100/test-set size, so equal sums may differ in the last bits."""
    return 1e-9 * max(1.0, float(np.abs(d).sum()))


def sign_flip_p(diffs: Sequence[float]) -> float:
    """Exact two-sided sign-flip permutation p-value of the paired differences: the share of all
    2^n sign patterns whose |mean| is at least the observed one (the observed pattern counts).
    Under the null hypothesis that each difference is symmetric around 0 every pattern is
    equally likely. n ≤ 20 (2^n patterns are enumerated)."""
    d = _array(diffs)
    n = len(d)
    if n == 0:
        raise ValueError("sign_flip_p needs at least one difference")
    if n > 20:
        raise ValueError(f"sign_flip_p enumerates 2^n patterns; n = {n} is too many")
    codes = np.arange(2 ** n)[:, None] >> np.arange(n)[None, :]
    signs = (codes & 1) * 2 - 1
    sums = np.abs(signs @ d)
    observed = abs(float(d.sum()))
    return float(np.count_nonzero(sums >= observed - _tolerance(d)) / 2 ** n)


def paired(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Paired:
    """Row ``a`` against row ``b``, element i of both from the same seed."""
    a, b = _array(a), _array(b)
    if len(a) != len(b):
        raise ValueError(f"paired needs equally long arrays ({len(a)} vs {len(b)})")
    d = a - b
    n = len(d)
    if n == 0:
        return Paired(0, None, None, None, None, None, None)
    diff = float(d.mean())
    if n == 1:
        return Paired(1, diff, None, None, None, None, None)
    sd = float(d.std(ddof=1))
    lo, hi = t_interval(diff, sd, n, confidence)
    if sd <= _tolerance(d):
        # Every seed gives the same difference: t = diff / 0. No difference at all is no
        # evidence (p = 1); the same non-zero difference on every seed is the limit p = 0.
        p_t = 1.0 if abs(diff) <= _tolerance(d) else 0.0
        lo = hi = diff
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            p_t = float(stats.ttest_rel(a, b).pvalue)
    p_perm = sign_flip_p(d) if n <= MAX_EXACT_PERMUTATION else None
    return Paired(n, diff, sd, lo, hi, p_t, p_perm)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment (controls the family-wise error rate). ``None`` entries (no
    test) stay ``None`` and are not counted in the family."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    m = len(idx)
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda i: pvalues[i])):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        out[i] = running
    return out


def pooled_sd(groups: Iterable[tuple[float, int]]) -> tuple[float | None, int]:
    """Pooled standard deviation of several samples given as (sample std, n): the square root of
    sum((n_i - 1) s_i^2) / sum(n_i - 1). Returns (sd, degrees of freedom); samples with n < 2
    carry no information and are skipped; (None, 0) when none is left."""
    num = dof = 0
    for sd, n in groups:
        if n >= 2 and sd is not None:
            num += (n - 1) * sd ** 2
            dof += n - 1
    return (math.sqrt(num / dof), dof) if dof else (None, 0)


def paired_power(d: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired (one-sample) t-test with n pairs at standardized effect
    d = true mean difference / sd of the differences: T has the noncentral t distribution with
    n - 1 degrees of freedom and noncentrality d·sqrt(n)."""
    df = n - 1
    crit = stats.t.ppf(1 - alpha / 2, df)
    nc = d * math.sqrt(n)
    # P(T < -crit) as P(T' > crit) with T' = -T ~ nct(df, -nc): scipy's far lower tail of
    # nct.cdf can come out NaN where this is a clean (tiny) number.
    return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc))


def detectable_effect_size(n: int, power: float = POWER, alpha: float = ALPHA) -> float:
    """The standardized effect d at which the two-sided paired t-test with n pairs has the given
    power (root of :func:`paired_power` - power). n ≥ 2."""
    if n < 2:
        raise ValueError("a paired t-test needs at least 2 pairs")
    f = lambda d: paired_power(d, n, alpha) - power  # noqa: E731
    hi = 1.0
    while f(hi) < 0:
        hi *= 2
    return float(optimize.brentq(f, 0.0, hi, xtol=1e-10))


def minimal_detectable_difference(sd_diff: float, n: int, power: float = POWER,
                                  alpha: float = ALPHA) -> float:
    """The smallest true mean difference (in the units of ``sd_diff``, the std of the paired
    differences) that a two-sided paired t-test over n seeds detects with the given power."""
    return detectable_effect_size(n, power, alpha) * sd_diff
