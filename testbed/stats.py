"""Means and 95% confidence intervals over seeds (Student's t), and the claims they allow.

``mean_ci([2.1, 2.0, 2.2])`` -> ``{"mean", "half", "n", "sd"}``: the half-width of the
two-sided interval ``t_{1-a/2, n-1} * sd / sqrt(n)`` (``half`` is None for one value).
``paired(a, b)`` is the same over the per-seed differences ``a_s - b_s`` (seeds pair
the runs: same data, same init). ``claim(d)`` reads a difference: ``"no difference"``
when it is not larger than its half-width, else the signed value with its interval.
"""
import math

# t_{0.975, df}: the two-sided 95% quantile of Student's t, df = seeds - 1
T975 = {1: 12.7062, 2: 4.3027, 3: 3.1824, 4: 2.7764, 5: 2.5706, 6: 2.4469, 7: 2.3646, 8: 2.306,
        9: 2.2622, 10: 2.2281, 11: 2.201, 12: 2.1788, 13: 2.1604, 14: 2.1448, 15: 2.1314,
        16: 2.1199, 17: 2.1098, 18: 2.1009, 19: 2.093, 20: 2.086, 21: 2.0796, 22: 2.0739,
        23: 2.0687, 24: 2.0639, 25: 2.0595, 26: 2.0555, 27: 2.0518, 28: 2.0484, 29: 2.0452,
        30: 2.0423}


def t975(df):
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (table to 30,
    then the Cornish-Fisher expansion around the normal quantile, error < 1e-3)."""
    if df < 1:
        raise ValueError(f"df: must be >= 1 (got {df})")
    if df in T975:
        return T975[df]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values):
    """Mean, standard deviation and 95% CI half-width of ``values`` (None entries dropped)."""
    xs = [float(v) for v in values if v is not None]
    n = len(xs)
    if n == 0:
        return {"mean": None, "half": None, "n": 0, "sd": None}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "half": None, "n": 1, "sd": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "half": half, "n": n, "sd": sd}


def paired(a, b):
    """:func:`mean_ci` of ``a[i] - b[i]`` over the pairs where both are present."""
    return mean_ci([x - y for x, y in zip(a, b) if x is not None and y is not None])


def differs(ci):
    """True when the interval excludes zero (a difference larger than its half-width)."""
    return ci["mean"] is not None and ci["half"] is not None and abs(ci["mean"]) > ci["half"]


def fmt_ci(ci, digits=4):
    if ci["mean"] is None:
        return "-"
    if ci["half"] is None:
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} ± {ci['half']:.{digits}f}"


def claim(ci, digits=4):
    """A difference as printed: ``no difference`` unless it exceeds its CI half-width."""
    if ci["mean"] is None:
        return "-"
    if ci["half"] is None:
        return f"{ci['mean']:+.{digits}f} (one seed: no CI)"
    if not differs(ci):
        return "no difference"
    return f"{ci['mean']:+.{digits}f} ± {ci['half']:.{digits}f}"
