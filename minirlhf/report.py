"""Aggregation for the reproduction report: 95% intervals over seeds and matched-KL interpolation."""
import math

# two-sided 95% Student-t critical values by degrees of freedom (no scipy dependency)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}


def t95(df):
    """The 0.975 quantile of Student's t with `df` degrees of freedom (the nearest tabulated df at or below)."""
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


def gold_at_kl(history, target_kl, key="eval/gold"):
    """`key` interpolated linearly at the first point where the evaluated KL reaches `target_kl` (evaluations in
    iteration order); None if the run never got that far from SFT."""
    for a, b in zip(history, history[1:]):
        if a["eval/kl"] <= target_kl <= b["eval/kl"]:
            w = 0.0 if b["eval/kl"] == a["eval/kl"] else (target_kl - a["eval/kl"]) / (b["eval/kl"] - a["eval/kl"])
            return a[key] + w * (b[key] - a[key])
    return None


def fmt(mean, half, n, digits=3):
    """'mean ± half-width', or the bare value when there is one seed (no interval to show)."""
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"
