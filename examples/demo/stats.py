"""Small statistics for the demo report: means with 95% t-intervals over seeds, Gao et al.'s RL fit, and a line fit
with a bootstrap interval of its R^2."""

from __future__ import annotations

import math
import random

T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)
"""Two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (beyond: 1.96 is within 10%)."""


def mean_interval(values: list[float]) -> dict[str, float]:
    """``{"mean", "low", "high", "n"}``: the mean and its 95% t-interval (``low == high == mean`` for one value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_interval needs at least one value.")
    n, mean = len(values), sum(values) / len(values)
    if n == 1:
        return {"mean": mean, "low": mean, "high": mean, "n": 1}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (T_975[n - 2] if n - 1 <= len(T_975) else 1.96) * sd / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n}


def fmt(interval: dict[str, float], digits: int = 3) -> str:
    """``mean [low, high]``."""
    return f"{interval['mean']:.{digits}f} [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"


def gao_rl_fit(d: list[float], gain: list[float]) -> dict[str, float]:
    """Least-squares fit of Gao et al. 2022's RL form ``R(d) = d (alpha - beta log d)`` (their eq. for RL, with
    ``d = sqrt(KL(pi || pi_0))`` and ``R`` the gold score gain over the initial policy), over points with d > 0.

    Returns ``alpha``, ``beta``, the fitted peak ``d_star = exp(alpha / beta - 1)`` and ``gain_star = beta * d_star``
    (where dR/dd = 0; NaN unless beta > 0, i.e. the fitted curve turns down), and the fit's ``r2`` (uncentered:
    the form has no intercept).
    """
    points = [(x, y) for x, y in zip(d, gain) if x > 0]
    if len(points) < 2:
        raise ValueError(f"gao_rl_fit needs at least two points with d > 0, got {len(points)}.")
    f1 = [x for x, _ in points]
    f2 = [-x * math.log(x) for x, _ in points]
    y = [v for _, v in points]
    a11, a12, a22 = sum(u * u for u in f1), sum(u * v for u, v in zip(f1, f2)), sum(v * v for v in f2)
    b1, b2 = sum(u * t for u, t in zip(f1, y)), sum(v * t for v, t in zip(f2, y))
    det = a11 * a22 - a12 * a12
    if abs(det) < 1e-12 * max(a11 * a22, 1e-300):
        raise ValueError("gao_rl_fit: the points do not determine both coefficients (all d equal?).")
    alpha, beta = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
    residual = sum((t - alpha * u - beta * v) ** 2 for u, v, t in zip(f1, f2, y))
    total = sum(t * t for t in y)
    d_star = math.exp(min(alpha / beta - 1, 50.0)) if beta > 0 else float("nan")
    return {"alpha": alpha, "beta": beta, "d_star": d_star, "gain_star": beta * d_star if beta > 0 else float("nan"),
            "r2": 1 - residual / total if total > 0 else float("nan")}


def linear_fit(x: list[float], y: list[float]) -> dict[str, float]:
    """Least-squares ``y = intercept + slope * x``: ``slope``, ``intercept`` and ``r2`` (NaN when y is constant)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"linear_fit needs two equally long lists of at least 2 points, got {len(x)} and {len(y)}.")
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((u - mx) ** 2 for u in x)
    if sxx == 0:
        raise ValueError("linear_fit: all x are equal, the slope is undetermined.")
    slope = sum((u - mx) * (v - my) for u, v in zip(x, y)) / sxx
    intercept = my - slope * mx
    total = sum((v - my) ** 2 for v in y)
    residual = sum((v - intercept - slope * u) ** 2 for u, v in zip(x, y))
    return {"slope": slope, "intercept": intercept, "r2": 1 - residual / total if total > 0 else float("nan")}


def bootstrap_r2(x: list[float], y: list[float], resamples: int = 2000, seed: int = 0) -> dict[str, float]:
    """95% percentile-bootstrap interval of ``linear_fit``'s R^2, resampling the points with replacement
    (resamples with constant x or y are redrawn). Returns ``low``, ``high`` and ``resamples``."""
    if resamples < 10:
        raise ValueError(f"resamples must be >= 10, got {resamples}.")
    if len(set(x)) < 2 or len(set(y)) < 2:
        raise ValueError("bootstrap_r2 needs at least two distinct x and two distinct y values.")
    rng = random.Random(seed)
    values: list[float] = []
    while len(values) < resamples:
        picks = [rng.randrange(len(x)) for _ in x]
        xs, ys = [x[i] for i in picks], [y[i] for i in picks]
        if len(set(xs)) > 1 and len(set(ys)) > 1:
            values.append(linear_fit(xs, ys)["r2"])
    values.sort()
    return {"low": values[int(0.025 * resamples)], "high": values[int(0.975 * resamples) - 1], "resamples": resamples}
