"""Margins m(y_c, y_r) for the margin losses (eq. 9) from annotator ratings.

Three sources, each a scalar function applied per row (``datasets.map`` friendly):

* ``rating_margin``: numeric rating delta, ``scale * (chosen - rejected)``.
* ``likert_margin``: Likert ratings on 1..K, delta normalized to [0, 1] by ``K - 1``, times ``scale``.
* ``label_margin``: a preference-strength label mapped to a number (Llama 2, Touvron et al. 2023,
  Table 28: "margin small" {1, 2/3, 1/3, 0} and "margin large" {3, 2, 1, 0}), times ``scale``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

LLAMA2_MARGIN_SMALL: dict[str, float] = {
    "significantly better": 1.0,
    "better": 2.0 / 3.0,
    "slightly better": 1.0 / 3.0,
    "negligibly better / unsure": 0.0,
}
LLAMA2_MARGIN_LARGE: dict[str, float] = {
    "significantly better": 3.0,
    "better": 2.0,
    "slightly better": 1.0,
    "negligibly better / unsure": 0.0,
}
MARGIN_SOURCES: tuple[str, ...] = ("column", "rating", "likert", "label")
"""Where a margin comes from: a ready ``margin`` column, a rating delta, Likert ratings, or strength labels."""


def _finite(value: float, what: str) -> float:
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    return number


def rating_margin(chosen: float, rejected: float, scale: float = 1.0) -> float:
    """``scale * (chosen - rejected)`` for numeric ratings (any scale, any sign)."""
    return scale * (_finite(chosen, "chosen rating") - _finite(rejected, "rejected rating"))


def likert_margin(chosen: int, rejected: int, num_points: int, scale: float = 1.0) -> float:
    """``scale * (chosen - rejected) / (num_points - 1)`` for ratings on a 1..num_points Likert scale."""
    if num_points < 2:
        raise ValueError(f"a Likert scale needs at least 2 points, got {num_points}")
    for name, rating in (("chosen", chosen), ("rejected", rejected)):
        if rating != int(rating) or not 1 <= rating <= num_points:
            raise ValueError(f"{name} Likert rating {rating!r} is not an integer in 1..{num_points}")
    return scale * (int(chosen) - int(rejected)) / (num_points - 1)


def normalize_label(label: str) -> str:
    """Case- and whitespace-insensitive form of a strength label."""
    return " ".join(str(label).lower().split())


def label_margin(label: str, mapping: Mapping[str, float] = LLAMA2_MARGIN_SMALL, scale: float = 1.0) -> float:
    """Margin of a preference-strength label (case and spacing ignored); unknown labels raise."""
    table = {normalize_label(key): float(value) for key, value in mapping.items()}
    key = normalize_label(label)
    if key not in table:
        raise ValueError(f"Unknown preference-strength label {label!r}. Allowed labels: {sorted(mapping)}.")
    return scale * table[key]
