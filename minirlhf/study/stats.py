"""Statistics over seeds with no dependency beyond the standard library: Student-t intervals,
the sign-flip test of a paired difference, and Holm's adjustment."""
import itertools
import math
import random

# two-sided 95% Student-t critical values by degrees of freedom (no scipy dependency)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
        10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}


def t95(df):
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the nearest
    tabulated df at or below)."""
    if df >= 30:
        return 1.96 if df > 120 else _T95[30]
    return _T95[max(k for k in _T95 if k <= df)]


def mean_ci(values):
    """(mean, half-width of the 95% t-interval) over seeds; half-width 0 for a single seed."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t95(n - 1) * sd / math.sqrt(n)


def sign_flip_p(diffs, draws=20000, rng=None):
    """Two-sided p-value of a paired mean difference by flipping the signs of the differences:
    exact (every sign pattern) up to 16 seeds, else `draws` random patterns. No distribution
    assumed."""
    n, observed, rng = len(diffs), abs(sum(diffs)), rng or random.Random(0)
    patterns = (itertools.product((1, -1), repeat=n) if n <= 16 else
                ([rng.choice((1, -1)) for _ in range(n)] for _ in range(draws)))
    # sampled: the observed pattern counts as one draw, so that p is never 0 (Phipson & Smyth)
    count = total = 0 if n <= 16 else 1
    for signs in patterns:
        total += 1
        count += abs(sum(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12
    return count / total


def holm(pvalues):
    """Holm's step-down adjustment of a family of p-values (same order as given)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted
