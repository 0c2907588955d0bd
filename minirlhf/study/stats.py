"""Statistics over seeds: Student-t intervals, the sign-flip test of a paired difference, and
Holm's adjustment. No dependency beyond numpy."""
import functools
import math

import numpy as np


def t_coverage(t, df):
    """P(|T| <= t) for Student's t with an integer `df`: the closed form in cos and sin of
    theta = atan(t / sqrt(df)) (Abramowitz & Stegun 26.7.3-4)."""
    theta = math.atan(t / math.sqrt(df))
    c2, total = math.cos(theta) ** 2, 0.0
    if df % 2 == 0:  # sin(theta) * (1 + c2 / 2 + (1 * 3) / (2 * 4) * c2^2 + ...), df / 2 terms
        term = 1.0
        for k in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * k - 1) / (2 * k)
        return math.sin(theta) * total
    # odd: (2 / pi) * (theta + sin(theta) * (cos + (2 / 3) cos^3 + ...)), (df - 1) / 2 terms
    term = math.cos(theta)
    for k in range(1, (df - 1) // 2 + 1):
        total += term
        term *= c2 * (2 * k) / (2 * k + 1)
    return 2 / math.pi * (theta + math.sin(theta) * total)


@functools.lru_cache(maxsize=None)
def t95(df):
    """The 0.975 quantile of Student's t with `df` degrees of freedom, exact to 1e-10 (bisection
    on t_coverage)."""
    lo, hi = 0.0, 20.0 if df > 1 else 100.0
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_coverage(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


def mean_ci(values):
    """(mean, half-width of the 95% t-interval) over seeds; half-width 0 for a single seed."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t95(n - 1) * sd / math.sqrt(n)


EXACT_UP_TO = 40  # seeds; 2 x 2^20 sums at most
DRAWS = 100_000  # random sign patterns beyond: p's standard error at most 0.5 / sqrt(DRAWS)


def signed_sums(x):
    """The sum of every sign pattern of `x` (2^len(x) of them)."""
    sums = np.zeros(1)
    for v in x:
        sums = np.concatenate([sums + v, sums - v])
    return sums


def sign_flip_p(diffs):
    """Two-sided p-value of a paired mean difference by flipping the signs of the differences:
    the share of sign patterns whose |sum| is at least the observed one. Exact up to EXACT_UP_TO
    seeds (every pattern, counted as one half's sums against the other's, sorted); beyond, DRAWS
    random patterns with the observed one counted as a draw (Phipson & Smyth). No distribution
    assumed."""
    d = np.asarray(diffs, dtype=float)
    observed = abs(d.sum()) - 1e-9  # the observed pattern itself, summed in another order
    if observed <= 0:
        return 1.0
    if len(d) <= EXACT_UP_TO:
        left, right = signed_sums(d[:len(d) // 2]), np.sort(signed_sums(d[len(d) // 2:]))
        # |l + r| >= observed  <=>  r >= observed - l  or  r <= -observed - l
        count = (len(right) * len(left) - np.searchsorted(right, observed - left).sum()
                 + np.searchsorted(right, -observed - left, side="right").sum())
        return int(count) / 2 ** len(d)
    signs = np.random.default_rng(0).choice((-1.0, 1.0), size=(DRAWS, len(d)))
    return (1 + int((np.abs(signs @ d) >= observed).sum())) / (DRAWS + 1)


def holm(pvalues):
    """Holm's step-down adjustment of a family of p-values (same order as given)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
