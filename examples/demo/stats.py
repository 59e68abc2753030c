"""Small statistics for the demo report: means with 95% t-intervals over seeds, Gao et al.'s RL and best-of-n fits,
a line fit with a bootstrap interval of its R^2, Spearman's rank correlation with a bootstrap interval, and best-of-n
expectations."""

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
    alpha, beta, r2 = _fit_d_alpha_beta(d, gain, lambda x: x * math.log(x), "gao_rl_fit")
    d_star = math.exp(min(alpha / beta - 1, 50.0)) if beta > 0 else float("nan")
    return {"alpha": alpha, "beta": beta, "d_star": d_star, "gain_star": beta * d_star if beta > 0 else float("nan"), "r2": r2}


def _fit_d_alpha_beta(d: list[float], gain: list[float], curvature, name: str) -> tuple[float, float, float]:
    """Least squares of ``gain = alpha d - beta curvature(d)`` over the points with d > 0 (no intercept): ``alpha``,
    ``beta`` and the uncentered ``r2``."""
    points = [(x, y) for x, y in zip(d, gain) if x > 0]
    if len(points) < 2:
        raise ValueError(f"{name} needs at least two points with d > 0, got {len(points)}.")
    f1, f2, y = [x for x, _ in points], [-curvature(x) for x, _ in points], [v for _, v in points]
    a11, a12, a22 = sum(u * u for u in f1), sum(u * v for u, v in zip(f1, f2)), sum(v * v for v in f2)
    b1, b2 = sum(u * t for u, t in zip(f1, y)), sum(v * t for v, t in zip(f2, y))
    det = a11 * a22 - a12 * a12
    if abs(det) < 1e-12 * max(a11 * a22, 1e-300):
        raise ValueError(f"{name}: the points do not determine both coefficients (all d equal?).")
    alpha, beta = (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det
    residual = sum((t - alpha * u - beta * v) ** 2 for u, v, t in zip(f1, f2, y))
    total = sum(t * t for t in y)
    return alpha, beta, 1 - residual / total if total > 0 else float("nan")


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


def ranks(values: list[float]) -> list[float]:
    """1-based ranks of ``values``, tied values sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for position in range(start, end + 1):
            result[order[position]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the (tie-averaged) ranks; NaN if either is constant."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two equally long lists of at least 2 values, got {len(x)} and {len(y)}.")
    rx, ry = ranks(x), ranks(y)
    mean = (len(x) + 1) / 2
    sxy = sum((a - mean) * (b - mean) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mean) ** 2 for a in rx), sum((b - mean) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def bootstrap_spearman(groups: list[tuple[list[float], list[float]]], draws: int = 1000, seed: int = 0) -> dict[str, float]:
    """The mean over ``groups`` (e.g. seeds, each its own proxy) of Spearman(x, y), with a 95% percentile bootstrap
    interval: each draw resamples the (x, y) pairs of every group with replacement and averages the groups' values.
    Returns ``{"mean", "low", "high", "n"}`` (``n``: the groups) like ``mean_interval``."""
    import numpy as np

    if not groups or draws < 1:
        raise ValueError(f"bootstrap_spearman needs at least one group and one draw, got {len(groups)} and {draws}.")
    rng = np.random.default_rng(seed)

    def rank_rows(values):  # per row: tie-averaged ranks (ties are common after resampling)
        order = np.argsort(values, axis=1, kind="stable")
        sorted_values = np.take_along_axis(values, order, axis=1)
        result = np.empty_like(values)
        for row in range(values.shape[0]):
            _, first, counts = np.unique(sorted_values[row], return_index=True, return_counts=True)
            mean_rank = np.repeat(first + (counts + 1) / 2, counts)
            result[row, order[row]] = mean_rank
        return result

    def rows_spearman(x, y):
        rx, ry = rank_rows(x), rank_rows(y)
        rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
        return (rx * ry).sum(axis=1) / np.sqrt((rx**2).sum(axis=1) * (ry**2).sum(axis=1))

    point, draws_sum = [], np.zeros(draws)
    for x, y in groups:
        point.append(spearman(x, y))
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        picks = rng.integers(0, len(x), size=(draws, len(x)))
        draws_sum += rows_spearman(x[picks], y[picks])
    low, high = np.nanpercentile(draws_sum / len(groups), [2.5, 97.5])
    return {"mean": sum(point) / len(point), "low": float(low), "high": float(high), "n": len(groups)}


def best_of_n_means(proxy: list[float], gold: list[float], ns: list[int]) -> dict[str, list[float]]:
    """Expected proxy and gold score of the proxy's best of ``n`` samples drawn without replacement from the
    ``N = len(proxy)`` samples of one prompt, for each ``n`` in ``ns`` (the unbiased estimator of Nakano et al.
    2021 / Gao et al. 2022): with the samples sorted by proxy, the i-th smallest (1-based) is the best of a random
    n-subset with probability C(i-1, n-1) / C(N, n)."""
    count = len(proxy)
    if len(gold) != count or not ns or min(ns) < 1 or max(ns) > count:
        raise ValueError(f"best_of_n_means needs equally long scores and 1 <= n <= {count}, got {len(gold)} gold and n in {ns}.")
    order = sorted(range(count), key=lambda i: proxy[i])
    result: dict[str, list[float]] = {"proxy": [], "gold": []}
    for n in ns:
        total = math.comb(count, n)
        weights = [math.comb(i, n - 1) / total for i in range(count)]  # i = rank - 1
        result["proxy"].append(sum(w * proxy[j] for w, j in zip(weights, order)))
        result["gold"].append(sum(w * gold[j] for w, j in zip(weights, order)))
    return result


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || pi_0) = log n - (n - 1) / n (the analytic bound Gao et al. 2022 use), in nats."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}.")
    return math.log(n) - (n - 1) / n


def gao_bon_fit(d: list[float], gain: list[float]) -> dict[str, float]:
    """Least-squares fit of Gao et al. 2022's best-of-n form ``R(d) = d (alpha - beta d)`` (``d = sqrt(KL_bon)``,
    ``R`` the gold gain over n = 1), over points with d > 0. Returns ``alpha``, ``beta``, the peak
    ``d_star = alpha / (2 beta)`` and ``gain_star = alpha^2 / (4 beta)`` (NaN unless beta > 0 and alpha > 0: a curve
    that rises, then turns down), and the uncentered ``r2``."""
    alpha, beta, r2 = _fit_d_alpha_beta(d, gain, lambda x: x * x, "gao_bon_fit")
    peaked = beta > 0 and alpha > 0
    return {"alpha": alpha, "beta": beta, "d_star": alpha / (2 * beta) if peaked else float("nan"),
            "gain_star": alpha * alpha / (4 * beta) if peaked else float("nan"), "r2": r2}
